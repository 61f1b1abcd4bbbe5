"""Calibration statistics for LLM.int8()-style pricing: per-feature absmax and the row sample."""

from __future__ import annotations

import torch
from toy_models import tiny_llama, token_batches

from cost_model.calibration import INPUT_SAMPLE_ROWS, collect_statistics
from ir import capture, find_weight_sites, sites_from_modules


def test_input_absmax_and_sample_of_a_linear_input(mlp, mlp_batches):
    sites = sites_from_modules(mlp, ["fc1.weight"])
    stats = collect_statistics(mlp, sites, mlp_batches, progress=False, sensitivity_batches=0)[sites[0].name]
    x = torch.cat([b[0] for b in mlp_batches])  # 4 batches of 64 rows
    torch.testing.assert_close(stats.input_absmax, x.abs().amax(0), rtol=0, atol=0)
    # 32 rows (every 2nd) from each forward call until INPUT_SAMPLE_ROWS are taken
    expected = torch.cat([b[0][::2][:32] for b in mlp_batches])[:INPUT_SAMPLE_ROWS]
    torch.testing.assert_close(stats.input_sample, expected, rtol=0, atol=0)
    # its own storage: a view would keep a whole calibration activation alive
    assert stats.input_sample.untyped_storage().nbytes() == stats.input_sample.numel() * 4


def test_sites_reading_one_activation_share_absmax_and_sample():
    model = tiny_llama(tied=True, layers=1)
    batches = token_batches(n=2)
    sites, _ = find_weight_sites(capture(model, (batches[0][0],)), model)
    stats = collect_statistics(model, sites, batches, progress=False, sensitivity_batches=0)
    attn = "model.layers.0.self_attn"
    q, k = stats[f"{attn}.q_proj.weight"], stats[f"{attn}.k_proj.weight"]
    assert q.input_absmax is k.input_absmax and q.input_sample is k.input_sample
    assert q.input_sample.shape == (min(INPUT_SAMPLE_ROWS, 2 * 32), 64)
    table = stats["model.embed_tokens.weight"]  # tied: its first linear-like use (lm_head) is measured
    assert table.input_absmax is not None and table.input_absmax.shape == (64,)
