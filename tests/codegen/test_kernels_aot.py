"""``benchmarks/kernels_aot.py``: every kernel template compiles for sm_90 without a GPU (Triton's
bundled ptxas), with the argument specialization a real launch gets, and the SASS loop statistics
it prints for offline tuning."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_quick_variants_compile_for_sm90_with_loop_stats():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels_aot.py"), "--quick", "--sass", "dequant gemv int4g32 fp16"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    done = re.search(r"(\d+)/(\d+) variants compiled for sm_90", run.stdout)
    assert done and done.group(1) == done.group(2) and int(done.group(2)) >= 10, run.stdout[-2000:]
    # the GEMV's K loop, disassembled: a body of real size that loads codes and x every iteration
    stats = re.search(r"dequant gemv int4g32 fp16.*\n\s+loop: instructions (\d+), barriers \d+, global loads (\d+)", run.stdout)
    assert stats, run.stdout[-3000:]
    assert int(stats.group(1)) > 50 and int(stats.group(2)) >= 2


def test_operator_launches_compile_for_sm90_through_the_jit():
    """The operators' own launch code (the argument lists they pass, None for the pointers a kernel
    compiles out, Triton's specialization of them) compiles for sm_90: every quantized format's
    GEMV/GEMM with and without bias and low-rank term, the q/k/v group and the SwiGLU pair with the
    norm, low-rank (t in registers and given), Monarch's three paths."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels_aot.py"), "--launch"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    done = re.search(r"(\d+)/(\d+) operator launches compiled for sm_90", run.stdout)
    assert done and done.group(1) == done.group(2) and int(done.group(2)) >= 50, run.stdout[-2000:]
    assert "_dequant_gemv_group_kernel" in run.stdout and "_monarch_stage1_kernel" in run.stdout
