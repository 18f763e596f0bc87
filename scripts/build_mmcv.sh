#!/usr/bin/env bash
# Build (once) and install mmcv 2.1.0 with its compiled ops for the torch in the active Python.
#
# mmcv 2.1.0 is the newest release mmdet 3.3 accepts, and it has no wheel for recent torch: this builds
# one from the PyPI sdist with the C++ standard raised to C++20 (recent torch headers need it) and caches
# the wheel, so later runs install in seconds. Usage: scripts/build_mmcv.sh [PYTHON]
set -euo pipefail
PY=$(realpath -s "$(command -v "${1:-python}")")  # absolute: the build runs in another folder
CACHE=${ALPHACLIP_WHEEL_CACHE:-$HOME/.cache/alphaclip-plugins/wheels}
TORCH=$("$PY" -c "import torch; print(torch.__version__.replace('+', '_'))")
DEST="$CACHE/mmcv-2.1.0-torch$TORCH"
mkdir -p "$DEST"
if ! ls "$DEST"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # mmcv's setup.py imports pkg_resources (gone from setuptools 81) and needs torch at build time.
  "$PY" -m pip install -q "setuptools>=77,<81" wheel
  "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$work"
  tar xzf "$work"/mmcv-2.1.0.tar.gz -C "$work"
  sed -i -E "s/'-std=c\+\+1[47]'/'-std=c++20'/g" "$work/mmcv-2.1.0/setup.py"
  echo "building mmcv 2.1.0 with ops for torch $TORCH (about 25 minutes on 2 cores)..."
  (cd "$work/mmcv-2.1.0" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$DEST.partial")
  mv "$DEST.partial"/mmcv-2.1.0-*.whl "$DEST"/ && rmdir "$DEST.partial"
fi
"$PY" -m pip install -q --no-deps "$DEST"/mmcv-2.1.0-*.whl
