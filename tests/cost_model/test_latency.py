"""Latency estimates: a rewritten op's fused-kernel estimate applies where its kernels run (GPU
profiles), its torch path's elsewhere; every kernel-backed family offers one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cost_model import MatmulCost, get_profile, roofline_seconds
from ir import sites_from_modules
from passes.blockdiag import BlockDiagConfig, BlockDiagTransform
from passes.kronecker import KroneckerConfig, KroneckerTransform
from passes.lowrank import LowRankTransform
from passes.lq import LQConfig, LQTransform
from passes.monarch import MonarchConfig, MonarchTransform

CPU, H100 = get_profile("cpu"), get_profile("h100")


def test_sums_keep_the_fused_estimate_and_profiles_pick_theirs():
    pair = MatmulCost(10, 1000, 2, MatmulCost(10, 400, 1))
    plain = MatmulCost(5, 100, 1)
    total = pair + plain
    assert total.on(CPU) == MatmulCost(15, 1100, 3)
    assert total.on(H100) == MatmulCost(15, 500, 2)  # the plain part counts as it is in both
    assert (plain + plain).fused is None and (plain + plain).on(H100) == MatmulCost(10, 200, 2)
    assert roofline_seconds(total, H100) < roofline_seconds(MatmulCost(15, 1100, 3), H100)
    assert roofline_seconds(total, CPU) == roofline_seconds(MatmulCost(15, 1100, 3), CPU)


@pytest.mark.parametrize(
    "transform, config",
    [
        (MonarchTransform(), MonarchConfig(16, 1)),
        (BlockDiagTransform(), BlockDiagConfig(4)),
        (KroneckerTransform(), KroneckerConfig(64, 64, 2)),
    ],
    ids=["monarch", "blockdiag", "kronecker"],
)
def test_structured_ops_are_one_launch_at_decode_on_a_gpu(transform, config):
    cost = transform.op_cost(config, 1, 4096, 4096, 2)
    assert cost.kernels >= 2 and cost.on(CPU).kernels == cost.kernels  # the torch path: several ops
    assert cost.on(H100).kernels == 1 and cost.on(H100).bytes < cost.bytes  # one launch, no intermediate copies
    assert cost.on(H100).flops == cost.flops


def test_kronecker_factors_past_the_kernels_tile_keep_the_torch_path():
    cost = KroneckerTransform().op_cost(KroneckerConfig(8, 8, 1), 1, 16384, 16384, 2)  # a 8 × 2048 input matrix
    assert cost.fused is None and cost.on(H100).kernels == 4


def _site(out=256, inn=512, rows=64):
    """A linear's site processing ``rows`` activation rows (sites rebuilt from modules have none)."""
    site = sites_from_modules(nn.Sequential(nn.Linear(inn, out)), ["0.weight"])[0]
    return dataclasses.replace(site, uses=tuple(dataclasses.replace(u, rows=rows) for u in site.uses))


def test_low_rank_and_lq_run_as_one_kernel_on_a_gpu():
    site = _site()
    lowrank = LowRankTransform._cost(site, 32, 4)
    assert lowrank.on(CPU).kernels == 2 and lowrank.on(H100).kernels == 1
    assert lowrank.on(H100).bytes < lowrank.bytes  # the rank-r intermediate stays on chip
    lq = LQTransform._cost(site, LQConfig(16, 4, 64), 0, 4)
    assert lq.on(CPU).kernels == 3 and lq.on(H100).kernels == 1


def test_gpu_latency_of_a_low_rank_layer_counts_one_launch():
    cost = LowRankTransform._cost(_site(), 32, 2)
    fused = cost.on(H100)
    expected = max(fused.flops / H100.peak(torch.float32), fused.bytes / H100.bytes_per_s) + H100.launch_s
    assert roofline_seconds(cost, H100) == pytest.approx(expected)


def test_prefill_rows_price_the_paths_the_operators_take():
    """Past the rows where measured kernels lose or need a first product, the GPU estimate follows
    the operator: block-diagonal keeps its torch path; low-rank computes t first (two launches)."""
    from codegen.kernels.blockdiag import KERNEL_MAX_M
    from codegen.kernels.lowrank import T_GIVEN_ROWS

    config = BlockDiagConfig(4)
    assert BlockDiagTransform().op_cost(config, KERNEL_MAX_M, 4096, 4096, 2).on(H100).kernels == 1
    prefill = BlockDiagTransform().op_cost(config, KERNEL_MAX_M + 1, 4096, 4096, 2)
    assert prefill.fused is None and prefill.on(H100) == prefill.on(CPU)
    decode, given = (LowRankTransform._cost(_site(rows=rows), 32, 2).on(H100) for rows in (1, T_GIVEN_ROWS))
    assert decode.kernels == 1 and given.kernels == 2


def test_quantized_prefill_on_a_gpu_prices_the_weight_decoded_once():
    """From DEQUANT_FIRST_M rows the operator decodes the weight to a dense matrix first: on a GPU
    profile that is one more launch and the dense weight written and read back; decode unchanged."""
    from codegen.kernels.dequant import DEQUANT_FIRST_M
    from passes.quant_storage import quantized_matmul_cost

    decode = quantized_matmul_cost(1, 4096, 4096, 4096 * 4096 // 2, 2)
    assert decode.fused is None and decode.on(H100) == decode.on(CPU)
    prefill = quantized_matmul_cost(DEQUANT_FIRST_M, 4096, 4096, 4096 * 4096 // 2, 2)
    assert prefill.on(CPU).kernels == 1 and prefill.on(H100).kernels == 2
    assert prefill.on(H100).bytes == prefill.on(CPU).bytes + 2 * 4096 * 4096 * 2
    lq = LQTransform._cost(_site(rows=DEQUANT_FIRST_M), LQConfig(16, 4, 64), 0, 2)
    assert lq.on(H100).kernels == lq.on(CPU).kernels + 1


def test_quantized_decode_on_a_gpu_streams_at_each_formats_measured_rate():
    """Decode (the GEMV) on a GPU profile: the packed bytes at the rate measured for the format
    relative to a dense matmul — int8 faster than fp16, int3 g64 slower despite 4.6× fewer bytes
    (H100: 1.80× and 0.86×) — while the CPU profile still prices bytes alone."""
    from cost_model.latency import matmul_cost
    from passes.quant_storage import Int8Config, IntNConfig, quantized_matmul_cost

    dense = matmul_cost(1, 4096, 4096, 4096 * 4096 * 2, 2)
    int8, int3 = (quantized_matmul_cost(1, 4096, 4096, c.nbytes(4096, 4096), 2, c) for c in (Int8Config(), IntNConfig(3, 64)))
    gpu = {name: roofline_seconds(c, H100, torch.float16) for name, c in (("dense", dense), ("int8", int8), ("int3", int3))}
    assert gpu["int8"] < gpu["dense"] < gpu["int3"], gpu
    assert roofline_seconds(int3, CPU) < roofline_seconds(dense, CPU)
    assert quantized_matmul_cost(1, 4096, 4096, 10**6, 2).fused is None  # no format given: bytes alone


def test_gemv_relative_rates_are_the_measured_ones():
    """``GEMV_RELATIVE_RATE`` is read off the raw GPU outputs kept in ``benchmarks/results``: per
    format, the latest run's 1 × 4096 → 4096 GEMV speedup over fp16 divided by its byte ratio."""
    from pathlib import Path

    from codegen.kernels.dequant import GEMV_RELATIVE_RATE

    measured = {}
    runs = sorted(Path(__file__).resolve().parents[2].glob("benchmarks/results/kernels_h100_run*.txt"), key=lambda p: int(p.stem.rsplit("run", 1)[1]))
    for path in runs:  # later runs overwrite earlier ones
        columns = None
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[:2] == ["out × in", "format"]:
                columns = {name: i for i, name in enumerate(cells)}
            elif not line.startswith("|"):
                columns = None
            elif columns and "weight bytes fp16/packed" in columns and cells[0] == "4096 × 4096":
                speedup = float(cells[columns["speedup"]].rstrip("×"))
                measured[cells[1]] = speedup / float(cells[columns["weight bytes fp16/packed"]].rstrip("×"))
    assert set(GEMV_RELATIVE_RATE) <= set(measured), measured
    for fmt, rate in GEMV_RELATIVE_RATE.items():
        assert abs(rate - measured[fmt]) <= 0.01, (fmt, rate, measured[fmt])
