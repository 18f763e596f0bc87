#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv with pinned torch and the given extras.
# Sourced by scripts/demo.sh and scripts/test.sh: `source scripts/env.sh EXTRAS`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
EXTRAS=${1:-}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
# torch 2.14.1 / torchvision 0.29.1 are the pinned pair this project is tested with.
"$PY" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null \
  || "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
export PATH="$VENV/bin:$PATH"
