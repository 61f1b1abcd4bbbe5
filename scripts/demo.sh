#!/usr/bin/env bash
# The main job: optimize the packaged SmolLM2-135M to 30% of its memory with 64 calibration
# sequences, print the report (memory measured, perplexity before/after), save to out/smollm2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/decomp optimize smollm2 --target-memory "${TARGET:-0.3}" --calibration 64 --out out/smollm2 "$@"
