"""The grouped dequant GEMV (two or three quantized weights on one input, one launch): q/k/v as
separate outputs, the SwiGLU pair, ragged row counts, every format, the prefill fallback, bad groups."""

from __future__ import annotations

import pytest
import torch

from codegen.kernels import dequant as D
from codegen.kernels.common import KernelError
from passes.quant_storage import Int8Config, IntNConfig, NF4Config, PackedWeight

FORMATS = (Int8Config(), IntNConfig(4, 32), IntNConfig(3, 64, True), IntNConfig(2, 128), NF4Config(64, True))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weights(config, sizes, inn, dtype, device, seed=0):
    codes, constants, spec = [], [], None
    for i, out in enumerate(sizes):
        w = torch.randn(out, inn, generator=torch.Generator().manual_seed(seed + i)) / inn**0.5
        pw = PackedWeight(config, (out, inn), dtype, config.encode(w)).to(device)
        f = D.QuantFormat.of(config)
        codes.append(pw.codes)
        constants.append([getattr(pw, n) for n in f.constant_names()])
        spec = f.spec
    return codes, constants, spec


def _check(device, close_to_truth, config, dtype, sizes, rows, pair, epilogue="", n_aux=0, norm=False, inn=70):
    # 70 input columns: ragged against every group size
    codes, constants, spec = _weights(config, sizes, inn, dtype, device)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(rows, inn, generator=g) * (3.0 if norm else 1.0)).to(device=device, dtype=dtype)
    aux = [torch.randn(rows, sizes[0], generator=g).to(device=device, dtype=dtype) for _ in range(n_aux)]
    nw = (1 + 0.2 * torch.randn(inn, generator=g)).to(device=device, dtype=dtype) if norm else None
    outs = D.quant_linear_group(x, codes, constants, spec, inn, pair, epilogue, aux, nw, 1e-5)
    refs = D.quant_linear_group_ref(x, codes, constants, spec, inn, pair, epilogue, aux, nw, 1e-5)
    truths = D.quant_linear_group_ref(x.double(), codes, constants, spec, inn, pair, epilogue, [a.double() for a in aux],
                                      None if nw is None else nw.double(), 1e-5)  # fmt: skip
    assert [tuple(o.shape) for o in outs] == [(rows, s) for s in (sizes[:1] if pair else sizes)]
    for i, (out, ref, truth) in enumerate(zip(outs, refs, truths)):
        assert out.dtype == dtype and out.is_contiguous()
        close_to_truth(out, ref, truth, f"{spec} {dtype} rows={rows} sizes={sizes} pair={pair} output {i}")
    return outs, x, codes, constants, spec


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", FORMATS, ids=lambda c: c.describe())
def test_qkv_outputs_match_three_linears(device, close_to_truth, config, dtype):
    # ragged row counts: one weight's last block must not spill into the next weight's rows
    outs, x, codes, constants, spec = _check(device, close_to_truth, config, dtype, (40, 13, 13), 1, False)
    if dtype == torch.float32:  # each output is that weight's own linear
        for out, c, k in zip(outs, codes, constants):
            torch.testing.assert_close(out, D.quant_linear(x, c, k, spec, 70), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", FORMATS, ids=lambda c: c.describe())
def test_swiglu_pair_matches_silu_gate_times_up(device, close_to_truth, config, dtype):
    _check(device, close_to_truth, config, dtype, (37, 37), 2, True)


@pytest.mark.parametrize("rows", [1, 4, 9], ids=lambda m: f"m{m}")
def test_two_weights_rows_and_prefill_fallback(device, close_to_truth, rows):
    # 9 rows > GEMV_MAX_M: separate GEMMs, same result
    _check(device, close_to_truth, IntNConfig(4, 32), torch.float16, (24, 9), rows, False)
    _check(device, close_to_truth, IntNConfig(4, 32), torch.float16, (24, 24), rows, True, "add", 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [Int8Config(), IntNConfig(4, 32), NF4Config(64, True)], ids=lambda c: c.describe())
@pytest.mark.parametrize("pair", [False, True], ids=["qkv", "pair"])
def test_rms_norm_folded_in(device, close_to_truth, config, dtype, pair):
    # 1100 columns: the norm's sum of squares and the GEMV both take several K steps
    sizes = (24, 24) if pair else (24, 8, 8)
    _check(device, close_to_truth, config, dtype, sizes, 1, pair, norm=True, inn=1100)
    _check(device, close_to_truth, config, dtype, sizes, 6, pair, norm=True)  # prefill fallback: norm in torch


def test_rms_norm_ref_is_hf_llamas():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(40, eps=1e-6).half()
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    x = torch.randn(3, 40).half() * 5
    with torch.no_grad():
        torch.testing.assert_close(D.rms_norm_ref(x, norm.weight, 1e-6), norm(x), rtol=0, atol=0)


def test_pair_epilogue_after_the_product(device, close_to_truth):
    _check(device, close_to_truth, IntNConfig(4, 32), torch.float32, (16, 16), 2, True, "gelu,add", 1)


def test_generated_source_has_both_modes_and_one_loop():
    source = D.gemv_group_kernel().source
    assert "if PAIR:" in source and "gate * tl.sigmoid(gate) * up" in source
    # the GEMV loop is one helper both kernels call, not a copy
    assert source.count("for k0 in tl.range(") == 1 and D.gemv_kernel().source.count("for k0 in tl.range(") == 1


def test_bad_groups_raise():
    codes, constants, spec = _weights(IntNConfig(4, 32), (8, 16), 64, torch.float32, "cpu")
    x = torch.randn(1, 64)
    with pytest.raises(KernelError, match="same number of rows"):
        D.quant_linear_group(x, codes, constants, spec, 64, True)
    with pytest.raises(KernelError, match="only a SwiGLU pair takes an epilogue"):
        D.quant_linear_group(x, codes, constants, spec, 64, False, "silu")
    with pytest.raises(KernelError, match=r"norm weight must be \(64,\)"):
        D.quant_linear_group(x, codes, constants, spec, 64, False, norm_weight=torch.ones(32))
    with pytest.raises(KernelError, match="2 or 3 weights"):
        D.quant_linear_group(x, codes[:1], constants[:1], spec, 64, False)
    other, other_constants, _ = _weights(IntNConfig(4, 32), (8,), 96, torch.float32, "cpu")
    with pytest.raises(KernelError, match="same row layout"):
        D.quant_linear_group(x, [codes[0], other[0]], [constants[0], other_constants[0]], spec, 64, False)


def test_dispatch_over_packed_weights(device):
    """``dispatch.quant_linear_group`` (what the decode proxy and callers use): the operator over
    the modules' buffers, outputs as the separate modules give them; mixed formats refused."""
    from codegen import dispatch
    from passes.quant_storage import QuantizedLinear

    def module(config, out, seed):
        w = torch.randn(out, 64, generator=torch.Generator().manual_seed(seed))
        return QuantizedLinear(PackedWeight(config, (out, 64), torch.float32, config.encode(w)), None).to(device)

    mods = [module(IntNConfig(4, 32), n, i) for i, n in enumerate((32, 16, 16))]
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(9)).to(device)
    with torch.no_grad(), dispatch.force_kernels():
        outs = dispatch.quant_linear_group(x, [m.packed for m in mods])
        (pair,) = dispatch.quant_linear_group(x, [mods[1].packed, mods[2].packed], pair=True)
        with pytest.raises(KernelError, match="share one format"):
            dispatch.quant_linear_group(x, [mods[0].packed, module(IntNConfig(4, 64), 32, 5).packed])
    with torch.no_grad(), dispatch.force_kernels(False):
        # fp32, summed per group (Σ s·Σq·x + min·Σx) vs the dequantized weight's matmul: rounding order only
        for out, m in zip(outs, mods):
            torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pair, torch.nn.functional.silu(mods[1](x)) * mods[2](x), rtol=1e-4, atol=1e-4)


def test_empty_and_strided_inputs(device):
    codes, constants, spec = _weights(IntNConfig(4, 32), (16, 8), 64, torch.float32, device)
    empty = D.quant_linear_group(torch.zeros(0, 64, device=device), codes, constants, spec, 64, False)
    assert [tuple(o.shape) for o in empty] == [(0, 16), (0, 8)]
    wide = torch.randn(2, 128, generator=torch.Generator().manual_seed(4)).to(device)
    x = wide[:, ::2]  # a strided view: copied to rows before the launch
    for out, ref in zip(D.quant_linear_group(x, codes, constants, spec, 64, False),
                        D.quant_linear_group_ref(x, codes, constants, spec, 64, False)):  # fmt: skip
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # fp32: per-group sums vs one matmul


@pytest.mark.parametrize("gemv_config", D.GEMV_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_every_tuning_config_with_the_norm(device, close_to_truth, monkeypatch, gemv_config):
    """The grouped kernel under each config the tuner may pick (the GEMV's loop variants, the norm
    folded in or not), q/k/v and the pair, 1096 columns: several K steps, a ragged last one and a
    multiple of 8 (the HALF2 loop's precondition). On a GPU only the HALF2 configs (their PTX)."""
    if device == "cuda" and not gemv_config["HALF2"]:
        pytest.skip("on the GPU: the HALF2 configs (the tuner runs the others)")
    import dataclasses

    kernel = dataclasses.replace(D.gemv_group_kernel(), configs=(gemv_config,))
    real = D._kernel
    monkeypatch.setattr(D, "_kernel", lambda builder, ep, *a: kernel if builder is D.gemv_group_kernel else real(builder, ep, *a))
    _check(device, close_to_truth, IntNConfig(4, 32), torch.float16, (24, 8, 8), 1, False, norm=True, inn=1096)
    _check(device, close_to_truth, IntNConfig(4, 32), torch.float16, (16, 16), 2, True, norm=True, inn=1096)
    _check(device, close_to_truth, IntNConfig(4, 32), torch.float16, (24, 8, 8), 1, False, norm=False, inn=1096)


@pytest.mark.parametrize("rows", [1, 3, 9], ids=lambda r: f"m{r}")  # 9 > GEMV_MAX_M: the separate GEMMs
@pytest.mark.parametrize("norm", [False, True], ids=["x", "norm"])
def test_biased_siblings_add_their_own_bias(device, close_to_truth, norm, rows):
    """Qwen2's q/k/v carry biases: each output gets its weight's bias (a wrong pointer after the
    runtime weight selection would add q's bias to k)."""
    sizes, inn = (48, 16, 16), 70
    codes, constants, spec = _weights(IntNConfig(4, 32), sizes, inn, torch.float16, device)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(rows, inn, generator=g).to(device=device, dtype=torch.float16)
    biases = [(torch.randn(s, generator=g) * (i + 1)).to(device=device, dtype=torch.float16) for i, s in enumerate(sizes)]
    nw = (1 + 0.2 * torch.randn(inn, generator=g)).to(device=device, dtype=torch.float16) if norm else None
    outs = D.quant_linear_group(x, codes, constants, spec, inn, False, norm_weight=nw, eps=1e-5, biases=biases)
    refs = D.quant_linear_group_ref(x, codes, constants, spec, inn, False, norm_weight=nw, eps=1e-5, biases=biases)
    truths = D.quant_linear_group_ref(x.double(), codes, constants, spec, inn, False, norm_weight=None if nw is None else nw.double(),
                                      eps=1e-5, biases=[b.double() for b in biases])  # fmt: skip
    for i, (out, ref, truth) in enumerate(zip(outs, refs, truths)):
        close_to_truth(out, ref, truth, f"output {i}")
    two = D.quant_linear_group(x, codes[1:], constants[1:], spec, inn, False, biases=biases[1:])  # W = 2 with biases
    for out, ref in zip(two, D.quant_linear_group_ref(x, codes[1:], constants[1:], spec, inn, False, biases=biases[1:])):
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_biases_go_one_per_weight_and_not_to_a_pair(device):
    codes, constants, spec = _weights(IntNConfig(4, 32), (32, 32), 64, torch.float32, device)
    x = torch.randn(1, 64, device=device)
    bias = torch.zeros(32, device=device)
    with pytest.raises(KernelError, match="one per weight"):
        D.quant_linear_group(x, codes, constants, spec, 64, True, biases=[bias, bias])
    with pytest.raises(KernelError, match="one per weight"):
        D.quant_linear_group(x, codes, constants, spec, 64, False, biases=[bias])
    with pytest.raises(KernelError, match=r"biases\[1\] must be"):
        D.quant_linear_group(x, codes, constants, spec, 64, False, biases=[bias, bias[:16]])
