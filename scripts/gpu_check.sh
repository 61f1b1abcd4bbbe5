#!/usr/bin/env bash
# One GPU session's checks, in the order they pay off: the compiled kernels' tests on the card,
# then benchmarks/kernels.py (correctness, speed, end to end). Uses the machine's own torch/triton
# (no install: the GPU machine has no network). Outputs go to $OUT (default ./gpu_out) as they
# are written, so a run cut short still returns what it had.
#   OUT=/tmp/x bash scripts/gpu_check.sh [budget seconds for the benchmark, default 300] [benchmark flags...]
#   SKIP_PYTEST=1 skips the tests (a short second session).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export DECOMP_CACHE="${DECOMP_CACHE:-/tmp/decomp_cache}"
BUDGET="${1:-300}"
PY="${PYTHON:-python}"
{
  nvidia-smi -L
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/device.txt" 2>&1
if [ "${SKIP_PYTEST:-0}" != 1 ]; then
  # the kernels added without a GPU last: the cap keeps the run bounded if they are slow to compile
  DECOMP_AUTOTUNE=0 timeout 180 "$PY" -m pytest -q -p no:cacheprovider \
    tests/codegen/test_gpu.py tests/codegen/test_monarch_kernel.py tests/codegen/test_blockdiag_kernel.py \
    tests/codegen/test_int8_outlier_kernel.py tests/codegen/test_kronecker_kernel.py > "$OUT/pytest_gpu.txt" 2>&1
  echo "pytest exit $?" >> "$OUT/pytest_gpu.txt"
  tail -3 "$OUT/pytest_gpu.txt"
fi
# the int4 GEMV's HALF2 loop is inline PTX, which the CPU interpreter cannot run: each of its configs
# on the card, alone and grouped (with the norm folded in); ~10 s
DECOMP_AUTOTUNE=0 timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/codegen/test_dequant_kernel.py \
  tests/codegen/test_group_kernel.py -k "tuning_config and HALF2True" > "$OUT/pytest_half2.txt" 2>&1
echo "pytest exit $?" >> "$OUT/pytest_half2.txt"
tail -2 "$OUT/pytest_half2.txt"
timeout $((BUDGET + 250)) "$PY" benchmarks/kernels.py --e2e --budget-s "$BUDGET" "${@:2}" 2>&1 | tee "$OUT/kernels.txt"
