#!/usr/bin/env bash
# timm's own model tests on the alphaclip_* models: tests/test_models.py from the sdist of the installed timm,
# unmodified, with a conftest that only imports the integration (tests/timm_suite/).
#
# Selection, as timm's own ViTs get it: `-k alphaclip`; `-m "not cfg or cfg_nonstd"` leaves out the standard
# default-cfg test, which timm runs only on models outside its NON_STD_FILTERS (its ViTs are in them; the
# non-standard one runs through tests/timm_suite/test_alphaclip_in_timm_lists.py); `not pretrained` leaves out
# the weight-download tests (timm's CI leaves them out too; no weights can be downloaded for these models).
# Big inputs are skipped by timm's own size limits (MAX_*_SIZE), as for timm's vit_large_patch14_clip_336.
# Usage: scripts/timm_suite.sh [PYTHON] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
shift || true
VERSION=$("$PY" -c "import timm; print(timm.__version__)")
CACHE=${ALPHACLIP_CACHE:-$HOME/.cache/alphaclip-plugins}
SDIST="$CACHE/timm-$VERSION.tar.gz"
mkdir -p "$CACHE"
[ -f "$SDIST" ] || "$PY" -m pip download -q --no-binary :all: --no-deps "timm==$VERSION" -d "$CACHE"
RUN="$CACHE/timm-suite-$VERSION"
rm -rf "$RUN" && mkdir -p "$RUN"
tar -xzf "$SDIST" -C "$RUN" --strip-components=2 "timm-$VERSION/tests/test_models.py"
tar -xzf "$SDIST" -C "$RUN" --strip-components=1 "timm-$VERSION/pyproject.toml"  # timm's pytest markers
cp tests/timm_suite/conftest.py tests/timm_suite/test_alphaclip_in_timm_lists.py "$RUN/"
cd "$RUN"
PYTHONPATH="$OLDPWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m pytest -q -c pyproject.toml -p no:cacheprovider \
  -W ignore::pytest.PytestUnknownMarkWarning -k "alphaclip and not pretrained" -m "not cfg or cfg_nonstd" \
  test_models.py test_alphaclip_in_timm_lists.py "$@"
