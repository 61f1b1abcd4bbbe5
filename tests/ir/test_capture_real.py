"""Capture of the real packaged models (SmolLM2: first layers only, to stay fast)."""

from __future__ import annotations

import copy

import pytest
import torch

from ir import UseKind, capture, find_weight_sites

pytestmark = pytest.mark.slow


def test_smollm2_capture_two_layers():
    from passes import zoo

    model, tok = zoo.load_smollm2()
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 2
    small = AutoModelForCausalLM.from_config(config).eval()
    missing, _ = small.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    ids = zoo.wiki_tokens(tok, "calibration", 16)[None]
    sites, skipped = find_weight_sites(capture(small, (ids,)), small)
    assert len(sites) == 1 + 2 * 7 and not skipped
    assert sites[0].aliases == ("model.embed_tokens.weight", "lm_head.weight")
    assert sites[0].matrix_shape == (49152, 576)
    torch.testing.assert_close(small.lm_head.weight, model.lm_head.weight)


def test_minilm_capture():
    from passes import zoo

    model, tok = zoo.load_minilm()
    enc = tok(["a short sentence", "another one"], padding=True, return_tensors="pt")
    sites, _ = find_weight_sites(capture(model, dict(enc)), model)
    assert sum(s.uses[0].kind is UseKind.LINEAR for s in sites) == 6 * 6 + 1
    assert sum(s.uses[0].kind is UseKind.EMBEDDING for s in sites) == 3
