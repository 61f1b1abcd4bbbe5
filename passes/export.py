"""ONNX export of optimized models, keeping packed weights packed, and an ONNX Runtime runner.

Where it sits: last, after ``optimize``/``apply``/``load``. Steps of :func:`export_onnx`:

1. capture with ``torch.export`` (``ir.capture``: non-strict, transformers models without
   their cache), every input dimension dynamic unless said otherwise; quantized weights
   trace as one ``decomp::*`` op each (``passes.dequant_ops``);
2. refuse any op outside aten/prims that has no ONNX translation, naming it and the module
   that calls it (an exporter must never fall back to something silently dense);
3. translate with ``torch.onnx.export(..., dynamo=True)`` and ``passes.onnx_lowering``'s
   translations (low-rank factors are two MatMuls with no help; quantized weights
   DequantizeLinear/codebook subgraphs over the packed buffers);
4. optimize with onnxscript's optimizer, folding only constants that do not grow (a cast
   of fp16 constants to fp32 or an unpacking of codes would add bytes to the file);
5. save as one file and check it: every packed buffer of the model is an initializer of the
   file, byte for byte.

A plain ``torch.onnx.export(model, args, dynamo=True)`` works as well once the translations
are registered (``passes.onnx_lowering.register_globally()``, done by any ``export_onnx``
call or by passing ``custom_translation_table=onnx_lowering.onnx_translations()``); it
writes the same graph, but torch's default optimizer folds constants of up to 8192 elements,
so small fp16 constants become fp32 and tiny layers (≤ 8192 codes) may be unpacked in the file.

Nothing here is imported by ``import passes`` beyond this module's torch-only top level:
onnx, onnxscript and onnxruntime are imported inside the functions that need them.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cost_model import stored_bytes
from ir import capture, split_inputs
from passes.quant_storage import PackedWeight

__all__ = ["DEFAULT_OPSET", "OnnxExport", "OnnxExportError", "OnnxModule", "export_onnx"]

#: Opset written by :func:`export_onnx`: 21 has DequantizeLinear with ``block_size``.
DEFAULT_OPSET = 21
_FIRST_PARTY = ("aten", "prims")


class OnnxExportError(RuntimeError):
    """The model cannot be exported to ONNX as it is stored (missing translation, lost packing)."""


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ``.onnx`` file.
        file_bytes: its size.
        stored_bytes: ``cost_model.stored_bytes`` of the exported model (its state_dict).
        opset: the ONNX opset of the default domain.
        inputs: input name → shape, dynamic dimensions as their symbol names.
        op_types: how many nodes of each ONNX op type the graph holds.
    """

    path: Path
    file_bytes: int
    stored_bytes: int
    opset: int
    inputs: dict[str, list[int | str]]
    op_types: dict[str, int] = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        """File bytes over stored bytes."""
        return self.file_bytes / max(self.stored_bytes, 1)


def _bound_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    try:
        return dict(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"example_inputs do not fit {type(model).__name__}.forward: {exc}") from None


def _dynamic_shapes(model: nn.Module, example_inputs: Any, dynamic_shapes: Any) -> dict[str, Any] | None:
    """``dynamic_shapes`` as a dict by argument name (every tensor dimension ``Dim.AUTO`` by default)."""
    if dynamic_shapes is False:
        return None
    args, kwargs = split_inputs(example_inputs)
    bound = _bound_inputs(model, args, kwargs)
    if dynamic_shapes is None:
        return {
            name: {i: torch.export.Dim.AUTO for i in range(value.dim())} if isinstance(value, torch.Tensor) else None
            for name, value in bound.items()
        }
    if isinstance(dynamic_shapes, dict):
        return dynamic_shapes
    if isinstance(dynamic_shapes, (tuple, list)):
        names = list(bound)
        if len(dynamic_shapes) != len(names):
            raise ValueError(f"dynamic_shapes has {len(dynamic_shapes)} entries for {len(names)} inputs {names}")
        return dict(zip(names, dynamic_shapes))
    raise TypeError("dynamic_shapes must be None (all dimensions dynamic), False (static), a dict or a tuple")


def _check_translations(program: torch.export.ExportedProgram, table: dict) -> None:
    """Every op outside aten/prims must have a translation; name the first one that has none."""
    unknown = {}
    for node in program.graph.nodes:
        target = node.target
        custom = isinstance(target, torch._ops.OpOverload) and target.namespace not in _FIRST_PARTY
        if node.op == "call_function" and custom and target not in table:
            unknown.setdefault(target, node)
    if not unknown:
        return
    from torch.onnx._internal.exporter._registration import (
        ONNXRegistry,  # the registry torch.onnx builds
    )

    registry = ONNXRegistry.from_torchlib(DEFAULT_OPSET)
    for target, node in unknown.items():
        if not registry.is_registered(target):
            raise OnnxExportError(_no_translation(target.name(), node))


def _no_translation(op: str, node=None) -> str:
    where = ""
    stack = (node.meta.get("nn_module_stack") or {}) if node is not None else {}
    if stack:
        path, cls = next(reversed(stack.values()))
        where = f" (called by {path or '<root>'}: {getattr(cls, '__name__', cls)})"
    return (
        f"{op} has no ONNX translation{where}; exporting it would need a dense or unsupported fallback. "
        "Register one (torch.onnx.export's custom_translation_table, or onnxscript's torch_lib registry) "
        "or replace the module before exporting."
    )


def _no_growth_fold(state_names: set[str]):
    """onnxscript ``should_fold`` hook: never fold the model's own tensors into more bytes.

    A node reading an initializer that holds model state (a parameter or buffer, or a fold
    of one) is folded only when its outputs are no larger than the state it consumes alone:
    a Transpose of a weight used once still folds, a Cast of fp16 constants to fp32, an
    unpacking of codes or a second copy of a tied table does not. Other nodes follow the
    optimizer's rules. ``state_names`` grows by the outputs of the folds it lets through.
    """

    def nbytes(value) -> int | None:
        if value.shape is None or value.dtype is None or not value.shape.is_static():
            return None
        return math.prod(value.shape) * value.dtype.itemsize

    def should_fold(node) -> bool | None:
        state = [v for v in node.inputs if v is not None and v.is_initializer() and v.name in state_names]
        if not state:
            return None
        sizes = [nbytes(v) for v in node.outputs]
        if any(s is None for s in sizes):
            return False
        freed = sum(v.const_value.nbytes for v in state if all(user is node for user, _ in v.uses()))
        if sum(sizes) > freed:
            return False
        state_names.update(v.name for v in node.outputs)
        return None

    return should_fold


def _packed_buffers(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(PackedWeight buffers, other int8/uint8 buffers)`` by FQN, one name per distinct tensor."""
    packed: dict[int, tuple[str, torch.Tensor]] = {}
    codes: dict[int, tuple[str, torch.Tensor]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, buf in module.named_buffers(recurse=False):
            entry = (f"{prefix}.{name}" if prefix else name, buf)
            if isinstance(module, PackedWeight):
                packed.setdefault(id(buf), entry)
            elif buf.dtype in (torch.int8, torch.uint8):
                codes.setdefault(id(buf), entry)
    codes = {k: v for k, v in codes.items() if k not in packed}
    return dict(packed.values()), dict(codes.values())


def _check_packed(model: nn.Module, onnx_model) -> None:
    """The packed weights reached the file as stored (none went dense).

    Every ``PackedWeight`` buffer must be an initializer with the same bytes; other int8/uint8
    buffers (codes of quantized modules written elsewhere) an initializer of the same dtype
    and element count, since their modules may transpose them, which folding then stores.
    """
    values = [v.const_value for v in onnx_model.graph.initializers.values() if v.const_value is not None]
    stored = {t.tobytes() for t in values}
    sizes = [(t.dtype.name.lower(), math.prod(t.shape)) for t in values]
    packed, codes = _packed_buffers(model)
    missing = [(n, b) for n, b in packed.items() if b.detach().cpu().contiguous().numpy().tobytes() not in stored]
    for name, buf in codes.items():
        key = (str(buf.dtype).removeprefix("torch."), buf.numel())
        if key in sizes:
            sizes.remove(key)
        else:
            missing.append((name, buf))
    if missing:
        name, buf = missing[0]
        raise OnnxExportError(
            f"the packed buffer {name} ({tuple(buf.shape)}, {buf.dtype}) is not in the ONNX file as stored"
            + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ": the export rewrote or materialised it (a translation or a constant fold that unpacks it)"
        )


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    dynamic_shapes: Any = None,
    opset: int = DEFAULT_OPSET,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    provenance: bool = False,
) -> OnnxExport:
    """Write ``model`` as an ONNX file that ONNX Runtime runs, its packed weights kept packed.

    Args:
        model: any module, typically returned by ``passes.optimize``/``apply``/``load``.
        example_inputs: positional inputs (tuple/list/tensor) or keyword inputs (dict). Give
            sizes ≥ 2 on dimensions that must stay dynamic (torch.export fixes size-1 dims).
        path: the ``.onnx`` file to write (one file; weights are not split out below 2 GB).
        dynamic_shapes: None makes every dimension of every tensor input dynamic where the
            model allows it (``torch.export.Dim.AUTO``); False exports static shapes; or a
            dict by argument name / tuple by position, as ``torch.export`` takes it.
        opset: ONNX opset of the default domain (≥ 21 writes blocked DequantizeLinear).
        input_names, output_names: optional names for the graph's inputs and outputs.
        provenance: keep torch.onnx's per-node metadata (source stack trace, FX node, module
            path; about 0.6 KB per node, the bulk of a small model's file).

    Returns:
        An :class:`OnnxExport` with the file's size beside the model's stored bytes.

    Raises:
        OnnxExportError: an op without ONNX translation (named, with its module), or a
            packed buffer that did not reach the file as stored.
        ir.CaptureError: the model cannot be captured by torch.export.
    """
    import onnxscript

    from passes import onnx_lowering

    path = Path(path)
    table = onnx_lowering.onnx_translations()
    was_training = model.training
    model.eval()
    try:
        program = capture(model, example_inputs, dynamic_shapes=_dynamic_shapes(model, example_inputs, dynamic_shapes))
    finally:
        model.train(was_training)
    _check_translations(program, table)
    try:
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=opset,
            custom_translation_table=table,
            optimize=False,
            input_names=input_names,
            output_names=output_names,
        )
    except torch.onnx.errors.OnnxExporterError as exc:
        missing = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", str(exc))
        if missing is None:
            raise
        op = missing.group(1).replace(".", "::", 1) + ("" if missing.group(2) == "default" else "." + missing.group(2))
        raise OnnxExportError(_no_translation(op)) from exc
    state_names = set(model.state_dict()) | {name for name, _ in model.named_buffers(remove_duplicate=False)}
    onnxscript.optimizer.optimize_ir(onnx_program.model, should_fold=_no_growth_fold(state_names))
    onnxscript.rewriter.onnx_fusions.fuse(onnx_program.model)
    _check_packed(model, onnx_program.model)
    if not provenance:
        for node in onnx_program.model.graph.all_nodes():
            node.metadata_props.clear()
    path.parent.mkdir(parents=True, exist_ok=True)
    big = sum(v.const_value.nbytes for v in onnx_program.model.graph.initializers.values() if v.const_value is not None)
    onnx_program.save(path, external_data=big >= 2**31 - 2**26)
    graph = onnx_program.model.graph
    op_types: dict[str, int] = {}
    for node in graph.all_nodes():
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        op_types[key] = op_types.get(key, 0) + 1
    return OnnxExport(
        path=path,
        file_bytes=path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data")),
        stored_bytes=stored_bytes(model),
        opset=onnx_program.model.opset_imports.get("", opset),
        inputs={v.name: [d if isinstance(d, int) else str(d) for d in v.shape] for v in graph.inputs},
        op_types=dict(sorted(op_types.items())),
    )


class OnnxModule(nn.Module):
    """An ONNX file run by ONNX Runtime, called like the module it was exported from.

    Positional tensors feed the graph inputs in order (keyword tensors by name); the result
    is the tuple of outputs as CPU torch tensors, or the one output when there is one. It
    has no parameters, so ``passes.evaluate.perplexity(OnnxModule(path), tokens)`` works.

    ONNX Runtime fuses an int8 ``DequantizeLinear → MatMul`` into ``MatMulNBits``, whose
    default accuracy level (4) quantizes the activations to int8 as well: 0.6% output error
    on a random 128 × 64 layer where level 1 (fp32 compute) matches torch exactly. This
    runner sets level 1 unless told otherwise; a plain ``InferenceSession`` takes it with
    ``options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")``.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (0: ONNX Runtime's default).
        providers: execution providers (default: CPU).
        accuracy_level: compute precision of fused quantized matmuls (1 fp32 … 4 int8), or
            None for ONNX Runtime's default.
    """

    def __init__(
        self, path: str | Path, threads: int = 0, providers: list[str] | None = None, accuracy_level: int | None = 1
    ):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if accuracy_level is not None:
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor):
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise TypeError(f"{self.path.name} takes inputs {self.input_names}; missing {missing}")
        outputs = self.session.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
        tensors = tuple(torch.from_numpy(o) for o in outputs)
        return tensors[0] if len(tensors) == 1 else tensors
