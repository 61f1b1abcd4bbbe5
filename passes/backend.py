"""The ``decomp`` backend of ``torch.compile``: plan and rewrite inside the compile, then inductor.

```python
compiled = torch.compile(model, backend="decomp", options={"target_memory": 0.5, "calibration": batches})
compiled = torch.compile(passes.optimize(model, ...), backend="decomp")   # only compiles
```

The backend is found by name without importing ``passes``: the package registers it under the
``torch_dynamo_backends`` entry point, which dynamo reads when it meets an unknown backend name.

Where it sits: after dynamo has traced a graph (``gm``), before inductor. Dynamo lifts the
model's parameters to graph inputs; each such input carries the real tensor and the source it
came from (``L['self']._modules['fc1']._parameters['weight']``). The backend

1. finds the module the parameters belong to (the root of that source, read from the frame
   dynamo is compiling),
2. plans and rewrites that *whole* module once, with :func:`passes.optimize` (or
   :func:`passes.apply` for a given plan) — one solve, one global memory budget over every
   weight of the model, whichever graph happens to be compiled first;
3. replaces each op of the graph that reads a rewritten weight (``linear``, ``embedding``,
   GPT-2's ``addmm``, 1×1 ``conv2d``) by a call of the rewritten module that took its place,
   and hands the graph to inductor.

The rewrite is cached by parameter identity (weakly, so a dead model frees it): a recompile
(new shapes, dynamic shapes) or the other pieces of a graph break look their weights up and
reuse the same rewritten modules — the model is decomposed once per ``torch.compile`` call
(per ``options`` object). A model that :func:`passes.optimize`/``apply``/``load`` already
rewrote (it carries ``.plan``) is only compiled, whatever the options say.

The user's model is not modified, and it keeps its dense weights: the compiled graph reads the
rewritten modules' smaller tensors, so the process holds both (original + compressed). To
hold only the compressed model, compile the result of :func:`passes.optimize` instead.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from ir import UseKind, sites_from_modules
from passes import pipeline
from passes.plan import Plan
from passes.report import Report

__all__ = ["OPTION_KEYS", "BackendError", "Decomposition", "decomp_backend", "decomposition"]

#: Keys ``options=`` accepts, and what they mean (mirrors :func:`passes.optimize`).
OPTION_KEYS: dict[str, str] = {
    "target_memory": "float in (0, 1] (fraction of stored bytes) or int bytes; plans and rewrites the model",
    "plan": "a passes.Plan (or a path to plan.json) to replay instead of solving",
    "calibration": "batches shaped like the model's inputs (activation-aware estimates and factors)",
    "transforms": "transform names to consider (default: passes.DEFAULT_TRANSFORMS)",
    "target_latency": "optional float in (0, 1], a latency budget row (see passes.optimize)",
    "device": "device profile for latency estimates ('cpu', 'h100')",
    "time_limit_s": "solver time limit in seconds",
    "example_inputs": "inputs to plan with (default: calibration[0], else the first call's arguments)",
    "progress": "show progress bars while planning (default False)",
    "inductor": "dict of inductor config patches, passed to torch._inductor.compile_fx",
    "group_siblings": "bool, default True: at decode sizes, sibling quantized linears (q/k/v; gate·up) run as one kernel "
    "with the RMSNorm before them folded in (codegen.siblings.group_siblings)",
}

_PLANNING_KEYS = ("target_memory", "target_latency", "calibration", "transforms", "device", "time_limit_s")


class BackendError(RuntimeError):
    """The backend cannot plan or rewrite this graph; the message says what to do instead."""


@dataclass
class Decomposition:
    """What the backend made of one model for one ``options`` object.

    Attributes:
        plan: the per-weight choices (as :func:`passes.optimize` returns them).
        report: the optimize report (``None`` when a plan was replayed).
        modules: dotted module path in the original model → the module that replaces it.
        rewritten: ids of the original parameters whose uses are replaced.
    """

    plan: Plan
    report: Report | None
    modules: dict[str, nn.Module]
    rewritten: set[int] = field(default_factory=set)
    # (id of original weight, use kind) -> [(module path, id of the original module's bias or None)]
    _uses: dict[tuple[int, UseKind], list[tuple[str, int | None]]] = field(default_factory=dict)
    _options: Any = None  # the options object this was made for (kept alive: its id is the key)


# Original parameter -> the decompositions made for it (one per options object). Weak on the
# parameter, so the compressed copies die with the model.
_BY_PARAMETER: WeakIdKeyDictionary = WeakIdKeyDictionary()


def decomposition(model: nn.Module, options: Mapping[str, Any] | None = None) -> Decomposition | None:
    """The rewrite the backend made of ``model`` (after the compiled model's first call).

    Args:
        model: the module passed to ``torch.compile``.
        options: the ``options`` dict of that call, when the model was compiled more than once
            with different options; by default the most recent decomposition.

    Returns:
        The :class:`Decomposition` (plan, report, replacement modules), or ``None`` if the
        backend has not rewritten this model.
    """
    for p in model.parameters():
        found = _BY_PARAMETER.get(p, [])
        for dec in reversed(found):
            if options is None or dec._options is options:
                return dec
    return None


# ---- options ------------------------------------------------------------------------------


def _check_options(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise BackendError(f"backend='decomp' takes options as a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        valid = "\n".join(f"  {k}: {v}" for k, v in OPTION_KEYS.items())
        raise BackendError(f"unknown backend='decomp' option(s) {unknown}; valid keys:\n{valid}")
    if "plan" in options and "target_memory" in options:
        raise BackendError("give backend='decomp' either 'plan' (replay) or 'target_memory' (solve), not both")
    planning = [k for k in _PLANNING_KEYS if k in options]
    if planning and "target_memory" not in options and "plan" not in options:
        raise BackendError(
            f"backend='decomp' options {planning} need 'target_memory' (or 'plan'): without a budget there is "
            "nothing to plan; drop them to only compile"
        )
    inductor = options.get("inductor", {})
    if not isinstance(inductor, Mapping):
        raise BackendError(f"options['inductor'] must be a dict of inductor config patches, got {inductor!r}")
    if not isinstance(options.get("group_siblings", True), bool):
        raise BackendError(f"options['group_siblings'] must be True or False, got {options['group_siblings']!r}")
    return dict(options)


# ---- finding the model the graph's parameters belong to ------------------------------------


def _parameter_inputs(gm: fx.GraphModule) -> dict[fx.Node, torch.Tensor]:
    """Placeholders of ``gm`` that are parameters (dynamo lifts them to inputs), with their tensors."""
    found = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        arg = node.meta.get("grapharg")
        example = getattr(arg, "example", None) if arg is not None else None
        if isinstance(example, nn.Parameter):
            found[node] = example
    return found


def _frame():
    """The frame dynamo is compiling (its ``f_locals``/``f_globals``/``f_code``), or ``None``."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except (ImportError, AttributeError):
        return None


def _owns(module: nn.Module, tensors: Sequence[torch.Tensor]) -> bool:
    ids = {id(p) for p in module.parameters()}
    return all(id(t) in ids for t in tensors)


def _modules_in(obj: Any) -> list[nn.Module]:
    """``obj`` if it is a module, or the modules directly inside a tuple/list/dict (``*args``)."""
    if isinstance(obj, nn.Module):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    return [o for o in items if isinstance(o, nn.Module)]


def _find_root(params: dict[fx.Node, torch.Tensor]) -> nn.Module:
    """The module all of the graph's parameters belong to: the root of their dynamo sources.

    Sources look like ``L['self']._modules['fc1']._parameters['weight']`` (or start at
    ``L['args'][0]`` under a decorator's ``*args`` wrapper, or at a global); their root is read
    from the frame dynamo is compiling. Falls back to the largest module among the frame's
    locals and globals that owns every parameter.
    """
    tx = _frame()
    f_locals = getattr(tx, "f_locals", None) or {}
    f_globals = getattr(tx, "f_globals", None) or {}
    tensors = list(params.values())
    from_sources = []
    for node in params:
        source = node.meta["grapharg"].source
        while getattr(source, "base", None) is not None:
            source = source.base
        if getattr(source, "local_name", None) in f_locals:
            from_sources += _modules_in(f_locals[source.local_name])
        elif getattr(source, "global_name", None) in f_globals:
            from_sources += _modules_in(f_globals[source.global_name])
    scanned = [m for v in list(f_locals.values()) + list(f_globals.values()) for m in _modules_in(v)]
    for group in (from_sources, scanned):
        owners = [m for m in group if _owns(m, tensors)]
        if owners:
            return max(owners, key=lambda m: sum(1 for _ in m.parameters()))
    names = [n.name for n in params][:3]
    raise BackendError(
        f"backend='decomp' could not find the nn.Module owning this graph's parameters ({names} ...); "
        "compile the module itself, torch.compile(model, backend='decomp', options=...), or call "
        "passes.optimize first and compile its result"
    )


def _call_arguments(root: nn.Module) -> tuple | dict | None:
    """The inputs of the call dynamo is compiling, if its frame is a call of ``root``.

    That frame is ``root.forward``, a decorator's wrapper around it (``wrapper(*args,
    **kwargs)`` with ``args[0]`` the module), or a wrapper closing over the module (dynamo's
    ``inner(*args, **kwargs)`` for ``nn.Sequential``); a resumed frame after a graph break is not.
    ``None``-valued keywords are dropped (they are the defaults). Returns positional inputs
    (tuple) or keyword inputs (dict), or ``None`` when the frame is not such a call or mixes both.
    """
    tx = _frame()
    code = getattr(tx, "f_code", None)
    if code is None or code.co_name.startswith("torch_dynamo_resume"):
        return None
    f_locals = tx.f_locals
    names = code.co_varnames
    n_pos, n_kw = code.co_argcount, code.co_kwonlyargcount
    positional, kwonly = list(names[:n_pos]), list(names[n_pos : n_pos + n_kw])
    i = n_pos + n_kw
    varargs = names[i] if code.co_flags & inspect.CO_VARARGS else None
    varkw = names[i + (varargs is not None)] if code.co_flags & inspect.CO_VARKEYWORDS else None
    extra = list(f_locals.get(varargs, ())) if varargs else []
    arguments = set(positional + kwonly) | {varargs, varkw}
    if positional and f_locals.get(positional[0]) is root:
        positional = positional[1:]
    elif not positional and extra and extra[0] is root:
        extra = extra[1:]
    elif not any(v is root for k, v in f_locals.items() if k in arguments) and any(
        v is root for k, v in f_locals.items() if k not in arguments
    ):
        pass  # a wrapper closing over the module (``inner(*args, **kwargs)`` calling ``fn``)
    else:
        return None
    if extra or code.co_posonlyargcount > 1:
        args = tuple(f_locals[n] for n in positional) + tuple(extra)
        keywords = [n for n in kwonly if f_locals.get(n) is not None]
        more = f_locals.get(varkw) if varkw else None
        return args if not keywords and not more else None
    kwargs = {n: f_locals[n] for n in positional + kwonly if f_locals.get(n) is not None}
    if varkw:
        kwargs.update({k: v for k, v in f_locals.get(varkw, {}).items() if v is not None})
    return kwargs


# ---- planning -----------------------------------------------------------------------------


def _decompose(root: nn.Module, options: dict[str, Any]) -> Decomposition:
    """Plan and rewrite ``root`` once (outside dynamo's tracing state); keep only what the graph needs."""
    calibration = options.get("calibration")
    batches = list(calibration) if calibration is not None else None
    example = options.get("example_inputs")
    if example is None and batches:
        example = batches[0]
    if example is None:
        example = _call_arguments(root)
    if example is None and "plan" not in options:
        raise BackendError(
            "backend='decomp' needs inputs to plan with: the first compiled graph is not the model's forward "
            "(a graph break before it?); pass options['example_inputs'] or options['calibration']"
        )
    progress = bool(options.get("progress", False))
    # Planning captures the model with torch.export and runs it eagerly: do that with no
    # dynamo tracing context installed, so export's fake tensors do not meet dynamo's.
    with torch._guards.tracing(None):
        if "plan" in options:
            plan = options["plan"]
            plan = plan if isinstance(plan, Plan) else Plan.load(plan)
            optimized = pipeline.apply(root, plan, calibration=batches, progress=progress)
        else:
            kwargs = {k: options[k] for k in _PLANNING_KEYS if k in options and k != "calibration"}
            optimized = pipeline.optimize(root, example, calibration=batches, progress=progress, **kwargs)
    plan = optimized.plan
    changed = list(plan.changed())
    sites = sites_from_modules(root, changed)
    dec = Decomposition(plan, getattr(optimized, "report", None), {}, _options=options)
    for site in sites:
        weight = root.get_parameter(site.name)
        dec.rewritten.add(id(weight))
        for use in site.uses:
            bias = getattr(root.get_submodule(use.module), "bias", None)
            dec.modules[use.module] = optimized.get_submodule(use.module)
            dec._uses.setdefault((id(weight), use.kind), []).append((use.module, None if bias is None else id(bias)))
    for p in root.parameters():
        _BY_PARAMETER.setdefault(p, []).append(dec)
    return dec


def _decomposition_for(params: dict[fx.Node, torch.Tensor], options: dict) -> Decomposition | None:
    for p in params.values():
        for dec in _BY_PARAMETER.get(p, []):
            if dec._options is options:
                return dec
    root = _find_root(params)
    if isinstance(getattr(root, "plan", None), Plan):
        warnings.warn(
            f"backend='decomp': this {type(root).__name__} was already rewritten by passes (it has .plan); "
            "compiling it as it is and ignoring the planning options",
            stacklevel=2,
        )
        return None
    return _decompose(root, options)


# ---- rewriting the graph ------------------------------------------------------------------

_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}
_ADDMM = {torch.addmm}
_CONV2D = {torch.conv2d, torch.nn.functional.conv2d}


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _classify(node: fx.Node, weight: fx.Node) -> tuple[UseKind, Any, Any] | None:
    """(use kind, activation input, bias input) of an op reading ``weight`` the way a module does."""
    if node.op != "call_function":
        return None
    if node.target in _LINEAR and _arg(node, 1, "weight") is weight:
        return UseKind.LINEAR, _arg(node, 0, "input"), _arg(node, 2, "bias")
    if node.target is torch.nn.functional.embedding and _arg(node, 1, "weight") is weight:
        return UseKind.EMBEDDING, _arg(node, 0, "input"), None
    if node.target is torch.embedding and _arg(node, 0, "weight") is weight:
        return UseKind.EMBEDDING, _arg(node, 1, "indices"), None
    if node.target in _ADDMM and _arg(node, 2, "mat2") is weight and not node.kwargs:
        return UseKind.CONV1D, _arg(node, 1, "mat1"), _arg(node, 0, "input")
    if node.target in _CONV2D and _arg(node, 1, "weight") is weight:
        return UseKind.CONV1X1, _arg(node, 0, "input"), _arg(node, 2, "bias")
    return None


def _where(node: fx.Node) -> str:
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    return f" ({trace[-2].strip()})" if len(trace) >= 2 else ""


class _Replacement:
    """Graph target running a replacement module on tensors passed in (``functional_call``).

    The module is not registered on the graph module: its tensors are registered once each
    (a tied table's shared buffers appear once), so inductor lifts no duplicate inputs.
    """

    def __init__(self, module: nn.Module, names: list[str], label: str):
        self.module = module
        self.names = names
        self.__name__ = self.__qualname__ = label

    def __call__(self, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.module, dict(zip(self.names, tensors)), (x,))


def _register_tensors(gm: fx.GraphModule, module: nn.Module, attrs: dict[int, str]) -> tuple[list[str], list[str]]:
    """Register ``module``'s tensors on ``gm`` (each distinct tensor once); their names there."""
    from torch._dynamo.source import ConstantSource

    names, targets = [], []
    tensors = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        if id(tensor) not in attrs:
            attr = f"decomp_tensor_{len(attrs)}"
            if isinstance(tensor, nn.Parameter):
                gm.register_parameter(attr, tensor)
            else:
                gm.register_buffer(attr, tensor)
            # aot_autograd maps every lifted parameter of a dynamo graph to a source (for its
            # duplicate-input guards); these tensors are distinct and not reachable from user
            # code, so a constant source of their own is all it needs.
            if hasattr(gm, "_param_name_to_source"):
                gm._param_name_to_source[attr] = ConstantSource(attr)
            attrs[id(tensor)] = attr
        names.append(name)
        targets.append(attrs[id(tensor)])
    return names, targets


def _rewrite_graph(gm: fx.GraphModule, params: dict[fx.Node, torch.Tensor], dec: Decomposition) -> int:
    """Replace every op reading a rewritten weight by a call of its replacement module; returns the count."""
    replaced = 0
    attrs: dict[int, str] = {}
    runners: dict[str, tuple[_Replacement, list[str]]] = {}
    for weight_node, weight in params.items():
        if id(weight) not in dec.rewritten:
            continue
        for user in list(weight_node.users):
            found = _classify(user, weight_node)
            uses = dec._uses.get((id(weight), found[0]), []) if found else []
            bias = params.get(found[2]) if found and isinstance(found[2], fx.Node) else None
            match = [path for path, bias_id in uses if bias_id == (None if bias is None else id(bias))]
            if not found or not match or (found[2] is not None and bias is None):
                raise BackendError(
                    f"backend='decomp' rewrote {weight_node.name} but the graph reads it in {user.format_node()}"
                    f"{_where(user)}, which is not the forward of the module it was planned for; compile the result "
                    "of passes.optimize instead, or exclude this weight"
                )
            path = match[0]
            if path not in runners:
                names, targets = _register_tensors(gm, dec.modules[path], attrs)
                runners[path] = (_Replacement(dec.modules[path], names, "decomp_" + path.replace(".", "_")), targets)
            runner, targets = runners[path]
            with gm.graph.inserting_before(user):
                tensors = [gm.graph.get_attr(t) for t in targets]
                call = gm.graph.call_function(runner, (found[1], *tensors))
            call.meta.update(user.meta)
            user.replace_all_uses_with(call)
            gm.graph.erase_node(user)
            replaced += 1
    gm.graph.lint()
    gm.recompile()
    return replaced


# ---- the backend --------------------------------------------------------------------------


def _inductor(gm: fx.GraphModule, example_inputs: list, mode: str | None, patches: Mapping[str, Any]):
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config = {**(list_mode_options(mode) if mode else {}), **patches}
    return compile_fx(gm, example_inputs, config_patches=config or None)


def decomp_backend(
    gm: fx.GraphModule, example_inputs: list, *, options: Mapping[str, Any] | None = None, mode: str | None = None
):
    """``torch.compile`` backend: plan and rewrite the compiled model's weights, then inductor.

    Called by dynamo, not by users: ``torch.compile(model, backend="decomp", options={...})``.
    Without ``target_memory``/``plan`` it only compiles (with inductor), which is what a
    model from :func:`passes.optimize` needs. See the module docstring for how recompiles and
    graph breaks share one plan.

    Args:
        gm: the graph dynamo traced.
        example_inputs: its inputs (parameters included).
        options: see :data:`OPTION_KEYS`.
        mode: ``torch.compile``'s ``mode``, passed to inductor.

    Raises:
        BackendError: unknown option keys (lists the valid ones), a model the backend cannot
            find or rewrite. Planning errors (``InfeasibleBudgetError``, ``CaptureError``, ...)
            propagate as they are; dynamo wraps them in ``BackendCompilerFailed``.
    """
    opts = _check_options(options)
    plans = "target_memory" in opts or "plan" in opts
    params = _parameter_inputs(gm) if plans else {}
    if params:
        dec = _decomposition_for(params, options)
        if dec is not None:
            _rewrite_graph(gm, params, dec)
    from codegen.fusion import fuse_epilogues, should_fuse  # light: triton only when a kernel runs

    if should_fuse(example_inputs):  # CUDA inputs: rewritten linears + their elementwise tails → one kernel
        fuse_epilogues(gm, group=opts.get("group_siblings", True))
    return _inductor(gm, example_inputs, mode, opts.get("inductor", {}))
