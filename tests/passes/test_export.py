"""ONNX export: the decomp ops' translations, ONNX Runtime parity per transform, dynamic
shapes, file size against stored bytes, tied tables stored once, and the error paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy_models import MLP, Wrap, tiny_llama, token_batches

import passes
from cost_model import stored_bytes
from passes import dequant_ops
from passes.blockdiag import BlockDiagConfig
from passes.int8_outlier import Int8OutlierConfig, Int8OutlierLinear, Int8OutlierWeight
from passes.kronecker import KroneckerConfig
from passes.monarch import MonarchConfig
from passes.quant_storage import Int8Config, IntNConfig, NF4Config, PackedWeight

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from passes import onnx_lowering
from passes.export import OnnxExportError, OnnxModule, _check_packed, export_onnx

FORMATS = [
    Int8Config(),
    IntNConfig(4, 32),
    IntNConfig(4, 64),
    IntNConfig(3, 64),
    IntNConfig(2, 32),
    NF4Config(64),
    IntNConfig(4, 64, double_quant=True),
    NF4Config(32, double_quant=True),
]
# The file holds the graph besides the weights: a few KB per quantized layer at most here.
GRAPH_BYTES = 64 * 1024


def _packed(config, out=40, inn=100, seed=0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    return PackedWeight(config, (out, inn), torch.float32, config.encode(w))


class _Dequantized(nn.Module):
    """Returns each packed weight dequantized: all of it, and the rows ``ids``."""

    def __init__(self, packed: list[PackedWeight]):
        super().__init__()
        self.packed = nn.ModuleList(packed)

    def forward(self, ids):
        return tuple(t for p in self.packed for t in (p.dequantize(), p.dequantize(rows=ids)))


def _ops(path) -> dict[str, int]:
    """Node counts by op type; ``matmul`` counts MatMul and Gemm together."""
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        for key in (node.op_type, "matmul") if node.op_type in ("MatMul", "Gemm") else (node.op_type,):
            counts[key] = counts.get(key, 0) + 1
    return counts


def _ulps(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference in units of fp32 rounding of the largest magnitude (2⁻²³·max|ref|)."""
    return ((out - ref).abs().max() / (ref.abs().max() * 2**-23)).item()


# ---- the ops and their translations ------------------------------------------------------


@pytest.mark.parametrize("config", FORMATS, ids=lambda c: c.describe())
def test_ops_compute_the_eager_dequantization(config):
    packed = _packed(config)
    buffers = dict(packed.named_buffers())
    constants = config._constants(buffers, None)
    assert torch.equal(config._dequantize_op(buffers["codes"], constants, 100), packed.dequantize())
    assert all(op.namespace == "decomp" for op in dequant_ops.OPS)


@pytest.mark.parametrize("opset", [21, 20])
def test_onnx_dequantization_matches_torch(tmp_path, opset):
    """The translated graphs compute the stored weights, whole and gathered rows: bit-exact with
    fp16 constants (a code times an fp16 scale is exact in fp32); with double-quantized
    constants torch's fused multiply-add (addcmul) rounds once where ONNX Runtime rounds
    twice: ≤ 1 ulp. Opset 21 writes blocked DequantizeLinear, 20 (torch.onnx's default) the
    same values per axis over a (rows·groups, group) view."""
    model = _Dequantized([_packed(c, seed=i) for i, c in enumerate(FORMATS)]).eval()
    ids = torch.tensor([3, 0, 39, 3])
    result = export_onnx(model, (ids,), tmp_path / "w.onnx", opset=opset)
    assert result.opset == opset
    outputs = OnnxModule(result.path)(torch.tensor([5, 39, 0]))
    for i, config in enumerate(FORMATS):
        full, rows = outputs[2 * i : 2 * i + 2]
        ref_full, ref_rows = model(torch.tensor([5, 39, 0]))[2 * i : 2 * i + 2]
        if getattr(config, "double_quant", False):
            assert _ulps(full, ref_full) <= 1 and _ulps(rows, ref_rows) <= 1, config.describe()
        else:
            assert torch.equal(full, ref_full) and torch.equal(rows, ref_rows), config.describe()
    graph = onnx.load(str(result.path)).graph
    blocks = sorted({a.i for n in graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "block_size"})
    assert blocks == ([32, 64] if opset >= 21 else [])
    assert _ops(result.path)["DequantizeLinear"] >= 5
    assert result.file_bytes <= 1.1 * result.stored_bytes + GRAPH_BYTES


# ---- every transform on a tiny model ------------------------------------------------------


def _lq(bits=4, g=32, nf4=False):
    return passes.LQConfig(8, bits, g, nf4=nf4, activation_aware=False)


TRANSFORMS = {
    "lowrank": passes.LowRankConfig(8, activation_aware=False),
    "int8": Int8Config(),
    "int4 g32": IntNConfig(4, 32),
    "int4 g64": IntNConfig(4, 64),
    "int3": IntNConfig(3, 64),
    "int2": IntNConfig(2, 32),
    "nf4": NF4Config(64),
    "double-quant constants": IntNConfig(4, 32, double_quant=True),
    "lq": _lq(),
    # the structured families (opt-in) are plain matmuls and reshapes: no translation needed
    "monarch": MonarchConfig(4, 2, activation_aware=False),
    "kronecker": KroneckerConfig(4, 4, 2, activation_aware=False),
    "blockdiag": BlockDiagConfig(2, activation_aware=False),
}


class _Parallel(nn.Module):
    """One Linear(48 → 96) per transform, all applied to the same input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(48, 96) for _ in TRANSFORMS)

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers)


def test_every_transform_runs_in_onnx_runtime(tmp_path):
    plan = passes.Plan({f"layers.{i}.weight": config for i, config in enumerate(TRANSFORMS.values())})
    opt = passes.apply(_Parallel().eval(), plan, progress=False)
    result = export_onnx(opt, (torch.randn(2, 5, 48),), tmp_path / "m.onnx")
    onnx_model = OnnxModule(result.path)
    for shape in ((2, 5, 48), (3, 9, 48)):  # one file, two batch sizes and lengths
        x = torch.randn(shape)
        with torch.no_grad():
            for name, out, ref in zip(TRANSFORMS, onnx_model(x), opt(x)):
                torch.testing.assert_close(out, ref, msg=lambda m, name=name: f"{name}: {m}")
    ops = _ops(result.path)
    # matmuls: lowrank 2, lq 3, the other 7 quantized layers 1, monarch and kronecker 2, blockdiag 1;
    # DequantizeLinear: int8, four intN, lq's int4, the double-quantized layer's codes and constants
    assert ops["matmul"] == 2 + 3 + 7 + 5 and ops["DequantizeLinear"] == 1 + 4 + 1 + 3 and ops["Gather"] >= 1
    assert result.file_bytes <= 1.1 * stored_bytes(opt) + GRAPH_BYTES
    floats = [i for i in onnx.load(str(result.path)).graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    dense = [i.name for i in floats if sorted(i.dims) == [48, 96]]
    assert not dense, f"dense fp32 weights in the file: {dense}"


# ---- a transformers model, optimized, two sequence lengths through one file ---------------


def test_optimized_llama_serves_several_lengths(tmp_path):
    model = tiny_llama()
    batches = token_batches(n=2, batch=2, seq=16)
    opt = passes.optimize(model, batches[0], target_memory=0.5, calibration=batches, progress=False)
    result = export_onnx(opt, (torch.randint(0, 256, (2, 8)),), tmp_path / "llama.onnx")
    assert all(isinstance(d, str) for d in result.inputs["input_ids"])  # batch and length dynamic
    onnx_model = OnnxModule(result.path)
    for shape in ((2, 8), (1, 5), (3, 21)):
        ids = torch.randint(0, 256, shape)
        with torch.no_grad():
            torch.testing.assert_close(onnx_model(ids), opt(ids).logits)
    assert result.file_bytes <= 1.1 * result.stored_bytes + GRAPH_BYTES
    assert result.stored_bytes == stored_bytes(opt) <= 0.5 * stored_bytes(model)
    if isinstance(opt.plan.entries.get("model.embed_tokens.weight", passes.KeepConfig()), passes.KeepConfig):
        tables = [i.name for i in onnx.load(str(result.path)).graph.initializer if sorted(i.dims) == [64, 256]]
        assert len(tables) == 1, tables


@pytest.mark.parametrize("config", [NF4Config(64, double_quant=True), _lq(3, 64)], ids=lambda c: c.describe())
def test_tied_quantized_table_is_stored_once(tmp_path, config):
    model = tiny_llama(layers=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = passes.apply(model, passes.Plan({"model.embed_tokens.weight": config}), progress=False)
    result = export_onnx(opt, (torch.randint(0, 256, (2, 6)),), tmp_path / "tied.onnx")
    initializers = onnx.load(str(result.path)).graph.initializer
    codes = [i.name for i in initializers if i.name.endswith("packed.codes")]
    assert len(codes) == 1, codes
    assert not [i.name for i in initializers if sorted(i.dims) == [64, 256] and i.data_type == onnx.TensorProto.FLOAT]
    assert result.file_bytes <= 1.1 * result.stored_bytes + GRAPH_BYTES
    ids = torch.randint(0, 256, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(OnnxModule(result.path)(ids), opt(ids).logits)


# ---- plain torch.onnx.export ---------------------------------------------------------------


def test_plain_torch_onnx_export_after_registration(tmp_path):
    onnx_lowering.register_globally()
    torch.manual_seed(0)
    opt = passes.apply(
        MLP().eval(),
        passes.Plan({"fc1.weight": IntNConfig(3, 32, True), "fc2.weight": NF4Config(32), "fc3.weight": Int8Config()}),
        progress=False,
    )
    x = torch.randn(4, 48)
    path = tmp_path / "plain.onnx"
    torch.onnx.export(opt, (x,), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim("rows")},))
    for rows in (4, 9):
        x = torch.randn(rows, 48)
        with torch.no_grad():
            torch.testing.assert_close(OnnxModule(path)(x), opt(x))
    assert {"DequantizeLinear", "BitShift", "Gather"} <= set(_ops(path))


# ---- what must fail, and how ----------------------------------------------------------------


@torch.library.custom_op("decomp_test::untranslated", mutates_args=())
def _untranslated(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_untranslated.register_fake
def _(x):
    return torch.empty_like(x)


class _Custom(nn.Module):
    def forward(self, x):
        return _untranslated(x)


def test_op_without_translation_is_named(tmp_path):
    model = Wrap(_Custom())
    with pytest.raises(OnnxExportError, match=r"decomp_test::untranslated.*no ONNX translation.*called by layer"):
        export_onnx(model, (torch.randn(3, 4),), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_densified_packed_weights_are_caught(tmp_path):
    """torch.onnx's default optimizer folds a layer of ≤ 8192 codes into a dense fp32 weight:
    the file check (run by export_onnx on its own output) refuses such a file."""
    import onnx_ir

    onnx_lowering.register_globally()
    model = Wrap(_Dequantized([_packed(NF4Config(64))])).eval()
    model.forward = lambda ids: model.layer.packed[0].dequantize() + ids.sum()
    path = tmp_path / "folded.onnx"
    torch.onnx.export(model, (torch.tensor([1, 2]),), str(path), dynamo=True)
    assert any(i.data_type == 1 and list(i.dims) == [40, 100] for i in onnx.load(str(path)).graph.initializer)
    with pytest.raises(OnnxExportError, match=r"layer.packed.0.codes"):
        _check_packed(model, onnx_ir.load(str(path)))


def test_int_mm_is_matmul_integer(tmp_path):
    """LLM.int8()-style layers multiply int8 by int8 with torch._int_mm: exact in ONNX too."""

    class IntMM(nn.Module):
        def forward(self, a, b):
            return torch._int_mm(a, b)

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (64, 24), dtype=torch.int8, generator=g)
    result = export_onnx(IntMM(), (a, b), tmp_path / "mm.onnx")
    assert result.op_types == {"MatMulInteger": 1}
    assert torch.equal(OnnxModule(result.path)(a, b), torch._int_mm(a, b))


def test_cli_export(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from passes.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from factories import mlp_with_data

    run = tmp_path / "run"
    assert main(["optimize", "factories:mlp_with_data", "--target-memory", "0.5", "--out", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "mlp.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out
    model, _, _ = mlp_with_data()
    restored = passes.load(run, model)
    x = torch.randn(5, 48)
    with torch.no_grad():
        torch.testing.assert_close(OnnxModule(tmp_path / "mlp.onnx")(x), restored(x))
    with pytest.raises(SystemExit, match="not found"):
        main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.onnx")])


def test_int8_outlier_layer_matches_torch(tmp_path):
    """LLM.int8()-style layers (quantize family's outlier option) export through MatMulInteger."""
    g = torch.Generator().manual_seed(0)
    config = Int8OutlierConfig()
    buffers = config.encode(torch.randn(24, 64, generator=g), torch.tensor([3, 10]))
    weight = Int8OutlierWeight(config, (24, 64), torch.float32, buffers)
    model = Wrap(Int8OutlierLinear(weight, None)).eval()
    result = export_onnx(model, (torch.randn(2, 5, 64),), tmp_path / "outlier.onnx")
    assert result.op_types["MatMulInteger"] == 1
    for shape in ((2, 5, 64), (3, 7, 64)):
        x = torch.randn(shape, generator=g)
        torch.testing.assert_close(OnnxModule(result.path)(x), model(x))
