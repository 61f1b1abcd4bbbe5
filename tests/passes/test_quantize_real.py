"""The quantize family on a real SmolLM2-135M decoder layer, against the fp32 layer on real hidden states.

SmolLM2's packaged weights were de-quantized from a 4-bit, group-32 gguf (Q4_1), so int4 g32
reproduces them (exactly, here); int8 and int3 g64 are the informative rows. The model is cut
to its first 6 decoder layers (the inputs of layer 5 do not depend on the later ones).
"""

from __future__ import annotations

import copy

import pytest
import torch
from toy_models import Wrap, sqnr_db

from cost_model import collect_statistics
from ir import sites_from_modules
from passes.int8_outlier import Int8OutlierConfig, Int8OutlierLinear, outlier_candidate
from passes.quant_storage import Int8Config, IntNConfig, PackedWeight, QuantizedLinear
from passes.quantize import QuantizeTransform
from passes.transform import Workspace

pytestmark = pytest.mark.slow

LAYER = 5


@pytest.fixture(scope="module")
def smollm2_head():
    """SmolLM2's first LAYER + 1 decoder layers, its tokenizer, and real hidden states of layer LAYER."""
    from transformers import AutoModelForCausalLM

    from passes import zoo

    model, tok = zoo.load_smollm2()
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = LAYER + 1
    small = AutoModelForCausalLM.from_config(config).eval()
    small.load_state_dict(model.state_dict(), strict=False)
    del model
    layer = small.model.layers[LAYER]
    inputs = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, key=key: inputs.__setitem__(key, args[0].detach()))
        for key, module in (("mlp", layer.mlp), ("q_proj", layer.self_attn.q_proj), ("down_proj", layer.mlp.down_proj))
    ]
    with torch.no_grad():  # held-out text: the evaluation split
        small(zoo.wiki_tokens(tok, "evaluation", 512).view(2, 256))
    for h in hooks:
        h.remove()
    return small, tok, inputs


def _quantized(linear: torch.nn.Linear, config) -> QuantizedLinear:
    w = linear.weight.detach()
    return QuantizedLinear(PackedWeight(config, tuple(w.shape), w.dtype, config.encode(w)), linear.bias)


# Output SQNR (dB) against the fp32 module, layer 5, 512 evaluation tokens. Measured (2 CPU
# cores, torch 2.13): mlp (gate, up and down all quantized) int8 37.7, int4 g32 ∞ (bit-exact:
# the Q4_1 grid), int3 g64 9.9; q_proj int8 44.5, int4 g32 ∞, int3 g64 17.0.
@pytest.mark.parametrize(
    ("config", "min_mlp", "min_q"),
    [(Int8Config(), 35.0, 42.0), (IntNConfig(4, 32), 60.0, 60.0), (IntNConfig(3, 64), 8.0, 15.0)],
    ids=lambda v: v.describe() if hasattr(v, "describe") else None,
)
def test_quantized_layer_matches_fp32(smollm2_head, config, min_mlp, min_q):
    small, _, inputs = smollm2_head
    layer = small.model.layers[LAYER]
    mlp = copy.deepcopy(layer.mlp)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, _quantized(getattr(mlp, name), config))
    with torch.no_grad():
        ref_mlp, out_mlp = layer.mlp(inputs["mlp"]), mlp(inputs["mlp"])
        q = layer.self_attn.q_proj
        ref_q, out_q = q(inputs["q_proj"]), _quantized(q, config)(inputs["q_proj"])
    assert sqnr_db(ref_mlp, out_mlp) > min_mlp
    assert sqnr_db(ref_q, out_q) > min_q


# LLM.int8() on layer 5's down_proj (12 of 1,536 inputs above 6.0 on 2,048 calibration tokens).
# Measured: output SQNR 29.5 dB (weight-only int8: 41.4 dB: per-token int8 activations cost more
# than int8 weights here); estimate / measured relative output error 0.77 (held-out text, whose
# activation error is 16% above the calibration text's; the estimate's activation part comes
# from 256 sampled calibration rows, ±10% from the draw: 0.86 with another one).
def test_int8_outlier_on_a_real_down_proj(smollm2_head):
    from passes import zoo

    small, tok, inputs = smollm2_head
    name = f"model.layers.{LAYER}.mlp.down_proj.weight"
    sites = sites_from_modules(small, [name])
    stats = collect_statistics(
        small, sites, zoo.calibration_batches(tok, n_seqs=8, seq_len=256), progress=False, sensitivity_batches=0
    )
    down = small.model.layers[LAYER].mlp.down_proj
    cand = outlier_candidate(sites[0], small, stats[name])
    assert cand is not None and 0 < (stats[name].input_absmax > 6.0).sum() < 64
    wrapped = Wrap(copy.deepcopy(down))
    site = sites_from_modules(wrapped, ["layer.weight"])[0]
    QuantizeTransform().rewrite(wrapped, site, Int8OutlierConfig(), Workspace(stats={site.name: stats[name]}))
    assert isinstance(wrapped.layer, Int8OutlierLinear)
    x = inputs["down_proj"]
    with torch.no_grad():
        ref, out, weight_only = down(x), wrapped(x), _quantized(down, Int8Config())(x)
    assert sqnr_db(ref, out) > 27.0
    measured = ((ref - out).pow(2).sum(-1).mean() / ref.pow(2).sum(-1).mean()).item()
    assert cand.error == pytest.approx(measured, rel=0.3)
    # the estimate ranks it as the measurement does: worse than weight-only int8 on this layer
    int8 = next(c for c in QuantizeTransform().candidates(sites[0], small, Workspace(stats=stats)) if c.config == Int8Config())
    assert sqnr_db(ref, weight_only) > sqnr_db(ref, out) and int8.error < cand.error
