"""Triton source from templates: epilogue slots, generated files, the compiled-kernel cache.

A kernel template (``codegen/kernels/<op>.py``) is Triton source with slots ``${KERNEL}`` (the
kernel's name), ``${AUX_PARAMS}`` (extra pointer parameters) and ``${EPILOGUE}`` (a line of its
own: statements run on the fp32 accumulator ``acc`` after the bias, before the single store,
at that line's indentation). Before the slot a template defines:

- ``acc``: the fp32 output tile (2-D for GEMM tiles, 1-D for GEMV rows),
- ``out_offs``: element offsets of that tile in the contiguous ``(M, N)`` output,
- ``out_mask``: which of them are in bounds,

An :class:`Epilogue` fills the slot: bias add, then a chain of activations and elementwise
``mul``/``add`` with auxiliary ``(M, N)`` tensors (the SwiGLU gate, a residual). Each step
fused this way is one elementwise kernel fewer, and one ``M × N`` intermediate that is never
written to and read back from global memory.

:func:`build` writes the instantiated source to a file (``$DECOMP_CACHE/kernels``, default
``~/.cache/decomp/kernels``; Triton reads kernel source with ``inspect``, so kernels cannot
come from ``exec``), imports it, wraps the kernel in ``triton.autotune`` over the template's
configs (keyed on a power-of-two *shape class* of M, not M itself, so a new prompt length
does not re-tune; the tuning results persist in Triton's disk cache where it has one) and caches
the result by (template, epilogue, interpret mode). With
``TRITON_INTERPRET=1`` (CPU tests) or ``DECOMP_AUTOTUNE=0`` the first config is used
without tuning.

Importing this module does not import triton; :func:`build` does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "NO_EPILOGUE",
    "Epilogue",
    "EpilogueError",
    "Kernel",
    "autotuning",
    "build",
    "built_kernel_ids",
    "cache_dir",
    "interpreting",
    "shape_class",
]

#: Activations an epilogue can apply, as Triton statements on ``acc`` (fp32).
ACTIVATIONS: dict[str, str] = {
    "silu": "acc = acc * tl.sigmoid(acc)",
    "gelu": "acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))",
    # tanh(u) = 2·sigmoid(2u) − 1 (tl has no tanh on every backend, the interpreter included)
    "gelu_tanh": "acc = 0.5 * acc * (2.0 * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)))",
    "relu": "acc = tl.maximum(acc, 0.0)",
}
#: Elementwise steps that read one auxiliary ``(M, N)`` tensor each.
BINARY: dict[str, str] = {"mul": "*", "add": "+"}

_STEP = re.compile(r"^(silu|gelu|gelu_tanh|relu|mul|add)$")


class EpilogueError(ValueError):
    """An epilogue spec names an unknown step; the message lists the valid ones."""


@dataclass(frozen=True)
class Epilogue:
    """What runs on a kernel's accumulator after the bias, as an ordered chain of steps.

    ``steps`` are activation names (:data:`ACTIVATIONS`) or ``"mul"``/``"add"``, each of
    which consumes the next auxiliary tensor (same shape as the output). The spec string is
    the steps joined by commas: ``"silu,mul"`` is SwiGLU's ``silu(x·Wgᵀ) * up``, ``"add"`` a
    residual add.
    """

    steps: tuple[str, ...] = ()

    def __post_init__(self):
        bad = [s for s in self.steps if not _STEP.match(s)]
        if bad:
            raise EpilogueError(f"unknown epilogue step(s) {bad}; valid: {sorted(ACTIVATIONS) + sorted(BINARY)}")

    @classmethod
    def parse(cls, spec: str) -> Epilogue:
        """``"silu,mul"`` → ``Epilogue(("silu", "mul"))``; ``""`` is the empty epilogue."""
        return cls(tuple(s.strip() for s in spec.split(",") if s.strip()))

    @property
    def spec(self) -> str:
        return ",".join(self.steps)

    @property
    def n_aux(self) -> int:
        """How many auxiliary tensors the chain reads."""
        return sum(s in BINARY for s in self.steps)

    def aux_params(self) -> str:
        return "".join(f"aux{i}_ptr, " for i in range(self.n_aux))

    def source(self, indent: str) -> str:
        """Triton statements applying the chain to ``acc`` (bias is the template's own, under ``HAS_BIAS``)."""
        lines, aux = [], 0
        for step in self.steps:
            if step in ACTIVATIONS:
                lines.append(ACTIVATIONS[step])
            else:
                load = f"tl.load(aux{aux}_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)"
                lines.append(f"acc = acc {BINARY[step]} {load}")
                aux += 1
        return "\n".join(indent + line for line in lines) or indent + "pass"

    def apply_ref(self, y, aux):
        """The same chain in torch on ``y`` (the reference semantics; fp32 in, fp32 out)."""
        import torch.nn.functional as F

        ops = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}
        it = iter(aux)
        for step in self.steps:
            if step in ops:
                y = ops[step](y)
            elif step == "mul":
                y = y * next(it).float()
            else:
                y = y + next(it).float()
        return y


#: The empty epilogue (bias only).
NO_EPILOGUE = Epilogue()


@dataclass(frozen=True)
class Kernel:
    """A built kernel: the launchable object, its generated source and the file holding it.

    Attributes:
        fn: the jitted kernel wrapped in ``triton.autotune`` (over every config when tuning,
            else over the default one alone); the plain interpreted function under the interpreter.
        source: the generated Triton source (what the tests inspect).
        path: where it was written.
        configs: the meta-parameter dicts the tuner chooses from (the first is the default).
        wrapped: whether ``fn`` carries its configs (else launches pass ``configs[0]`` themselves).
    """

    fn: Any
    source: str
    path: Path
    configs: tuple[dict, ...]
    wrapped: bool

    def launch(self, grid, *args, wrap=None, **kwargs):
        """Launch with the tuner's choice, or with the default config when untuned.

        ``wrap`` is ``torch.library.wrap_triton`` inside a ``triton_op`` (so that tracing
        records the kernel), or None for a direct launch.
        """
        fn = self.fn if wrap is None else wrap(self.fn)
        if self.wrapped:
            return fn[grid](*args, **kwargs)
        return fn[grid](*args, **kwargs, **self.configs[0])


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """Tune over a template's configs (off under the interpreter and with ``DECOMP_AUTOTUNE=0``)."""
    return not interpreting() and os.environ.get("DECOMP_AUTOTUNE", "1") != "0"


def shape_class(m) -> int:
    """The autotuning bucket of a row count: the next power of two, capped at 4096.

    A symbolic row count (a graph compiled with dynamic shapes) is passed through: the kernel
    then tunes per row count it meets.
    """
    if not isinstance(m, int):
        return m
    return min(1 << max(0, (m - 1).bit_length()), 4096)


def cache_dir() -> Path:
    root = Path(os.environ.get("DECOMP_CACHE", Path.home() / ".cache" / "decomp"))
    path = root / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


_BUILT: dict[tuple, Kernel] = {}

_HEADER = "# Generated by decomp.codegen from {origin}; do not edit.\nimport triton\nimport triton.language as tl\n\n"


def _write(source: str, stem: str) -> Path:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = cache_dir() / f"{stem}_{digest}.py"
    if not path.exists() or path.read_text() != source:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".py")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)  # atomic: concurrent builders write the same bytes
    return path


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"decomp_kernels.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tuning_cache_option() -> dict:
    """``cache_results=True`` where this Triton can keep tuning results on disk (its cache, keyed by
    the kernel source, the GPU architecture, the configs and the shape class), so that a second
    process does not tune again; ``DECOMP_AUTOTUNE_CACHE=0`` turns it off."""
    import inspect

    from triton.runtime.autotuner import Autotuner

    if os.environ.get("DECOMP_AUTOTUNE_CACHE", "1") == "0":
        return {}
    return {"cache_results": True} if "cache_results" in inspect.signature(Autotuner.__init__).parameters else {}


def build(template: str, name: str, epilogue: Epilogue, configs: tuple[dict, ...], key: tuple[str, ...], origin: str) -> Kernel:
    """Instantiate ``template`` with ``epilogue``, compile (lazily, by Triton) and cache it.

    Args:
        template: Triton source with ``${KERNEL}``, ``${AUX_PARAMS}`` and ``${EPILOGUE}``
            slots; the kernel is the function named ``${KERNEL}``.
        name: base name of the kernel (``_<op>_kernel``).
        epilogue: the chain to fuse.
        configs: meta-parameters to tune over; each dict may hold ``num_warps`` and
            ``num_stages`` beside the template's constexprs. The first is the default.
        key: kernel argument names whose values select a tuning result (the shape class).
        origin: module the template comes from (written into the generated header).

    Returns:
        The cached :class:`Kernel` for this (template, epilogue, mode, configs).
    """
    tuned = autotuning()
    interpret = interpreting()
    cache_key = (template, name, epilogue, tuned, interpret, repr(configs))
    if cache_key in _BUILT:
        return _BUILT[cache_key]
    import triton

    suffix = "_".join(epilogue.steps)
    kernel_name = f"{name}_{suffix}" if suffix else name
    slot = re.search(r"^([ \t]*)\$\{EPILOGUE\}[ \t]*$", template, re.MULTILINE)
    if slot is None and epilogue.steps:
        raise EpilogueError(f"template {name} has no ${{EPILOGUE}} slot; it cannot fuse {epilogue.spec!r}")
    if slot is not None:
        template = template[: slot.start()] + "${EPILOGUE}" + template[slot.end() :]
    body = string.Template(template).substitute(
        KERNEL=kernel_name, AUX_PARAMS=epilogue.aux_params(), EPILOGUE=epilogue.source(slot.group(1)) if slot is not None else ""
    )
    source = _HEADER.format(origin=origin) + body
    path = _write(source, kernel_name)
    fn = getattr(_import(path), kernel_name)
    # On GPU the kernel always carries its configs (one when not tuning), so launches never pass
    # num_warps/num_stages keywords, which torch.compile's tracing of user kernels would have to carry.
    if not interpret:
        tconfigs = []
        for c in configs if tuned else configs[:1]:
            meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
            tconfigs.append(triton.Config(meta, num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 2)))
        fn = triton.autotune(configs=tconfigs, key=list(key), **_tuning_cache_option())(fn)
    kernel = Kernel(fn, source, path, tuple(configs), not interpret)
    _BUILT[cache_key] = kernel
    return kernel


def built_kernel_ids() -> set[int]:
    """``id`` of every launchable object :func:`build` made (``Kernel.fn``; all kept alive by the cache)."""
    return {id(k.fn) for k in _BUILT.values()}
