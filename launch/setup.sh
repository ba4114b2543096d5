#!/usr/bin/env bash
# Create .venv (once) and install seqpar with its test extras. Safe to run again: it only adds what is missing.
#  - CPU machines get the pinned CPU build torch==2.13.0 (an unpinned torch pulls gigabytes of CUDA).
#  - Machines whose python3 already has torch (e.g. a CUDA build on a GPU box) reuse it through
#    --system-site-packages instead of installing another one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import torch, seqpar; print(f'seqpar ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
