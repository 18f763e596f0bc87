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
# Peers' own harnesses, only for the whole suite: timm's model tests on the alphaclip_* models (the sdist
# of the installed timm, cached), and the HF integration on older transformers (LLaVA's 4.37.2 with the
# original LLaVA code base, and 4.57) in cached venvs. The main run comes last, so its summary closes the
# output; a failure anywhere fails the run.
peers=0
if [ $# -eq 0 ]; then
  [ "${ALPHACLIP_SKIP_TIMM_SUITE:-0}" = 1 ] || bash scripts/timm_suite.sh "$PY" || peers=$?
  bash scripts/hf_venvs.sh test || peers=$?
fi
rc=0
"$PY" -m pytest -q "$@" || rc=$?
[ "$rc" -ne 0 ] && exit "$rc"
exit "$peers"
