"""Calibration statistics for LLM.int8()-style pricing: per-feature absmax and the row sample."""

from __future__ import annotations

import torch
from toy_models import tiny_llama, token_batches

from cost_model.calibration import INPUT_SAMPLE_ROWS, collect_statistics
from ir import capture, find_weight_sites, sites_from_modules


def test_input_absmax_and_sample_of_a_linear_input(mlp):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(100, 48, generator=g) * (1 + i),) for i in range(8)]
    sites = sites_from_modules(mlp, ["fc1.weight"])
    stats = collect_statistics(mlp, sites, batches, progress=False, sensitivity_batches=0)[sites[0].name]
    x = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(stats.input_absmax, x.abs().amax(0), rtol=0, atol=0)
    # 256 distinct rows, 32 drawn from each batch, stored as fp16
    sample = stats.input_sample
    assert sample.shape == (INPUT_SAMPLE_ROWS, 48) == (256, 48) and sample.dtype == torch.float16
    for i, (batch,) in enumerate(batches):
        rows = sample[32 * i : 32 * (i + 1)].float()
        match = (rows[:, None, :] == batch.half().float()[None]).all(-1)  # (32, 100)
        assert (match.sum(1) == 1).all() and match.any(0).sum() == 32
    # its own storage: a view would keep a whole calibration activation alive
    assert sample.untyped_storage().nbytes() == sample.numel() * 2


def test_sites_reading_one_activation_share_absmax_and_sample():
    model = tiny_llama(tied=True, layers=1)
    batches = token_batches(n=2)
    sites, _ = find_weight_sites(capture(model, (batches[0][0],)), model)
    stats = collect_statistics(model, sites, batches, progress=False, sensitivity_batches=0)
    attn = "model.layers.0.self_attn"
    q, k = stats[f"{attn}.q_proj.weight"], stats[f"{attn}.k_proj.weight"]
    assert q.input_absmax is k.input_absmax and q.input_sample is k.input_sample
    assert q.input_sample.shape == (2 * 4 * 32, 64)  # every row: 2 batches of 4×32 tokens
    table = stats["model.embed_tokens.weight"]  # tied: its first linear-like use (lm_head) is measured
    assert table.input_absmax is not None and table.input_absmax.shape == (64,)
