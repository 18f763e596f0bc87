#!/usr/bin/env bash
# The test suite, on CPU, from a fresh clone: installs what it needs into .venv, then runs pytest.
# mmcv 2.1 (for the MMDetection integration) is built once from source and cached (scripts/build_mmcv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh test
if [ -d alphaclip_plugins/integrations/mmdet ]; then
  bash scripts/build_mmcv.sh "$PY"
  # mmengine imports pkg_resources, which setuptools 81 removed.
  "$PY" -m pip install -q "mmdet==3.3.0" "mmengine==0.10.7" "setuptools>=77,<81"
fi
# timm's own model tests on the alphaclip_* models (the sdist of the installed timm, cached).
[ "${ALPHACLIP_SKIP_TIMM_SUITE:-0}" = 1 ] || bash scripts/timm_suite.sh "$PY"
exec "$PY" -m pytest -q "$@"
