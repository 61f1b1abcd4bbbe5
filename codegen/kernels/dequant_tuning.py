"""The tuning spaces of the dequantize-and-multiply kernels (:mod:`codegen.kernels.dequant_source`),
and what the H100 runs measured of them.

``codegen.template.build`` wraps each kernel in ``triton.autotune`` over one of these tuples; the
first config of each is the untuned default (the interpreter, ``DECOMP_AUTOTUNE=0``).
:func:`codegen.kernels.dequant.gemv_configs` picks the GEMV's subset for a launch.
"""

from __future__ import annotations

__all__ = ["DEQUANT_CONFIGS", "GEMM_CONFIGS", "GEMV_CONFIGS"]

#: GEMV tuning space (the first is the untuned default). Batch-1 decode reads each weight byte once,
#: so the tiles are sized for memory-level parallelism: 1–4 KB of int4 codes per program and
#: iteration, few rows per program so that a 4096-row weight gives 256–2048 programs. What the
#: H100 showed (runs 4–6: ~1.2 TB/s whatever the tiles) and the compiled loop explains (sm_90 SASS,
#: ``benchmarks/kernels_aot.py``): every iteration waited on its loads, and each code cost ~7
#: instructions, two of them conversions (int→fp32 at a quarter of the FMA rate, x fp16→fp32).
#: The switches below are variants of the same arithmetic for the tuner to choose between, by
#: measurement on the card it runs on (each is checked against the reference in the tests):
#:
#: - ``LS``: a loop-level ``num_stages`` (iterations in flight; 1 = none). On its own it did not
#:   move the 4096-wide rows (run 5: 8.9 vs 8.5 µs) and slowed the 576-wide ones (2.9 vs 2.5 µs),
#:   because the group constants, too narrow for async copies, stayed a load waited on per step.
#: - ``PREFETCH``: those constants issued one iteration ahead, widened only where used.
#: - ``ACC3``: accumulate ``w·x`` per code in a ``(BN, BK/GROUP, GROUP)`` tile and reduce once after
#:   the loop, instead of a per-group reduction (and its layout conversion) every iteration.
#: - ``MAGIC``: codes to fp32 through ``dequant_source._code_values`` (two full-rate instructions) instead of
#:   a conversion.
#:
#: - Larger tiles per iteration (``BK`` 1024–2048): bytes in flight. A 4096-row weight with BN = 8 is
#:   512 programs, ~4 per SM on an H100, each with one 2 KB load of codes outstanding: ~8 KB in
#:   flight per SM where ~18 KB (HBM3's ~3.3 TB/s × ~0.7 µs latency / 132 SMs) would be needed to
#:   stream at full speed — consistent with the ~1.2 TB/s measured. 4–8 KB per iteration, 72–79
#:   registers a thread and no spills (sm_90, ``kernels_aot.py``; 60 for the default).
#:
#: - The per-code cost, from the SASS (``kernels_aot.py``): the plain int4 loop is 221 instructions a
#:   thread for 32 codes, 32 of them ``I2FP`` conversions (an eighth of the FMA rate on sm_90);
#:   ``MAGIC`` removes them (all full-rate instructions).
#:
#: Run 7 (H100, every config alone at 4096², cold weights): the plain wide tiles win for int4
#: (``BN8 BK1024 LS1`` 8.1 µs, ``BN8 BK2048 LS1 w8`` 8.2, ``BN4 BK1024 LS1`` 8.5; the pipelined
#: ``BN8 BK512 LS3`` 8.8), and none of the stall-removing variants helps (prefetch 9.0, ``MAGIC``
#: 8.6–10.1, ``ACC3`` 9.2–9.5); int8, twice the bytes for the same codes, runs in the same
#: 8.5–8.9 µs at 1.9 TB/s — the loop is bound by work per code at this occupancy, not by its bytes
#: or one stall. Dropped after it, as the slowest for both formats: ``BN16 BK256 LS1`` (15.6 /
#: 23.1 µs), ``BN8 BK512 LS1 MAGIC`` (10.1 / 12.8) and the nibble-plane int4 loop (12.6). The
#: first config (the untuned default) is the fastest int4 one.
#:
#: - ``HALF2`` (int4 on fp16 only, ``WORDS``): codes read as 32-bit words and decoded two at a time
#:   into fp16 pairs by ``dequant_source.HALF2_ASM`` (``prmt``/``lop3``/``sub.f16x2``/``fma.f16x2``): 275 SASS
#:   instructions a thread per 64 codes against 410 (``kernels_aot.py``). Run 8 (H100, alone at
#:   4096², cold): ``BN8 BK2048 w8`` 6.0 µs = 2.74× fp16 (the fp32 loop's best: 8.1–8.2), ``BN16
#:   BK2048 w8`` 6.6, ``BN4 BK1024`` 6.7, ``BN8 BK1024`` 6.8, ``BN16 BK1024 w4`` 7.5; dropped after
#:   it: ``BN16 BK1024 w8`` 14.4, ``BN32 BK1024 w8`` 12.7, ``BN8 BK512 LS3`` 9.9. Error vs the fp64
#:   truth 0.0016 against eager torch's 0.0013 (fp16 products, four-term fp16 sums per lane).
#:   Launches with ``WORDS`` tune over the HALF2 configs only, the others over the rest
#:   (:func:`codegen.kernels.dequant.gemv_configs`); the first of each is its untuned default.
GEMV_CONFIGS = (
    {"BN": 8, "BK": 1024, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": False, "HALF2": False, "num_warps": 4, "num_stages": 1},
    {"BN": 8, "BK": 512, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": False, "HALF2": False, "num_warps": 4, "num_stages": 1},
    {"BN": 4, "BK": 1024, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": False, "HALF2": False, "num_warps": 4, "num_stages": 1},
    {"BN": 8, "BK": 512, "LS": 3, "PREFETCH": False, "ACC3": False, "MAGIC": False, "HALF2": False, "num_warps": 4, "num_stages": 3},
    {"BN": 8, "BK": 256, "LS": 4, "PREFETCH": False, "ACC3": False, "MAGIC": False, "HALF2": False, "num_warps": 4, "num_stages": 4},
    {"BN": 8, "BK": 512, "LS": 3, "PREFETCH": True, "ACC3": False, "MAGIC": False, "HALF2": False, "num_warps": 4, "num_stages": 3},
    {"BN": 4, "BK": 1024, "LS": 3, "PREFETCH": True, "ACC3": False, "MAGIC": False, "HALF2": False, "num_warps": 4, "num_stages": 3},
    {"BN": 8, "BK": 512, "LS": 3, "PREFETCH": True, "ACC3": True, "MAGIC": False, "HALF2": False, "num_warps": 4, "num_stages": 3},
    {"BN": 8, "BK": 512, "LS": 3, "PREFETCH": True, "ACC3": False, "MAGIC": True, "HALF2": False, "num_warps": 4, "num_stages": 3},
    {"BN": 4, "BK": 1024, "LS": 3, "PREFETCH": True, "ACC3": False, "MAGIC": True, "HALF2": False, "num_warps": 4, "num_stages": 3},
    {"BN": 8, "BK": 512, "LS": 3, "PREFETCH": True, "ACC3": True, "MAGIC": True, "HALF2": False, "num_warps": 4, "num_stages": 3},
    {"BN": 16, "BK": 256, "LS": 3, "PREFETCH": True, "ACC3": True, "MAGIC": True, "HALF2": False, "num_warps": 4, "num_stages": 3},
    {"BN": 8, "BK": 2048, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": False, "HALF2": False, "num_warps": 8, "num_stages": 1},
    {"BN": 16, "BK": 1024, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": True, "HALF2": False, "num_warps": 8, "num_stages": 1},
    {"BN": 4, "BK": 1024, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": True, "HALF2": False, "num_warps": 4, "num_stages": 1},
    {"BN": 8, "BK": 2048, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": False, "HALF2": True, "num_warps": 8, "num_stages": 1},
    {"BN": 4, "BK": 1024, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": False, "HALF2": True, "num_warps": 4, "num_stages": 1},
    {"BN": 8, "BK": 1024, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": False, "HALF2": True, "num_warps": 4, "num_stages": 1},
    {"BN": 16, "BK": 1024, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": False, "HALF2": True, "num_warps": 4, "num_stages": 1},
    {"BN": 16, "BK": 2048, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": False, "HALF2": True, "num_warps": 8, "num_stages": 1},
)

#: GEMM tuning space: tensor-core tiles up to 128×128 (BK = 128 or 256, multiples of every group
#: size), and BM = 16 tiles for a few rows (decode on tensor cores: the tile is decoded in the
#: input dtype and fed to ``tl.dot`` as is, so no per-weight conversion instructions).
GEMM_CONFIGS = (
    {"BM": 64, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BN": 128, "BK": 128, "num_warps": 8, "num_stages": 3},
    {"BM": 64, "BN": 128, "BK": 128, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4},
    {"BM": 32, "BN": 128, "BK": 128, "num_warps": 8, "num_stages": 4},
    {"BM": 16, "BN": 128, "BK": 128, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 32, "BK": 256, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 64, "BK": 256, "num_warps": 4, "num_stages": 3},
)

#: Dequantization tiles (``BK`` a multiple of every group size and of int3's 8-code words).
DEQUANT_CONFIGS = (
    {"BN": 32, "BK": 256, "num_warps": 4, "num_stages": 1},
    {"BN": 64, "BK": 128, "num_warps": 4, "num_stages": 1},
    {"BN": 16, "BK": 256, "num_warps": 4, "num_stages": 1},
    {"BN": 64, "BK": 256, "num_warps": 8, "num_stages": 1},
)
