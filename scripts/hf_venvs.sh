#!/usr/bin/env bash
# Cached virtual environments for testing the Hugging Face integration on older transformers releases.
#
#   bash scripts/hf_venvs.sh NAME   -> builds the venv NAME once (cached), prints its python
#   bash scripts/hf_venvs.sh test   -> builds both and runs tests/test_hf*.py and tests/test_mllm_train*.py in each (scripts/test.sh does)
#
# NAME is one of:
#   tf-4.37.2   transformers 4.37.2 / tokenizers 0.15.1 (LLaVA's pins), plus the original LLaVA code base
#               (llava-torch 1.2.2.post1, --no-deps, with the few packages its import and loader need)
#   tf-4.57.6   transformers 4.57.6 / tokenizers 0.22.2, the last 4.x release
#
# Each sits on one shared base venv holding the pinned torch pair and the package's own dependencies
# (a .pth file puts the base's site-packages after the venv's own), so a version venv installs only
# transformers, tokenizers and what they pin. The package itself is not installed: tests run it from the
# work tree with PYTHONPATH, so nothing can move transformers. Venvs live under
# ${ALPHACLIP_VENVS:-~/.cache/alphaclip-plugins/venvs}; one whose build did not finish is rebuilt.
set -euo pipefail
NAME=${1:?usage: hf_venvs.sh tf-4.37.2 | tf-4.57.6 | test}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ "$NAME" = test ]; then
  # transformers 5.x is the main venv's: the main test run covers it.
  failed=0
  for venv in tf-4.37.2 tf-4.57.6; do
    echo "== tests/test_hf*.py tests/test_mllm_train*.py on $venv"
    start=$SECONDS
    py=$(bash "$0" "$venv")
    echo "   venv ready in $((SECONDS - start)) s"
    start=$SECONDS
    (cd "$ROOT" && PYTHONPATH="$ROOT" "$py" -m pytest -q -p no:cacheprovider tests/test_hf*.py tests/test_mllm_train*.py) || failed=1
    echo "   tests ran in $((SECONDS - start)) s"
  done
  exit "$failed"
fi
CACHE=${ALPHACLIP_VENVS:-$HOME/.cache/alphaclip-plugins/venvs}
TORCH="torch==2.14.1 torchvision==0.29.1"
BASE_PKGS="numpy pillow safetensors open_clip_torch pycocotools tqdm pytest"
case "$NAME" in
  tf-4.37.2) PKGS="transformers==4.37.2 tokenizers==0.15.1 huggingface_hub==0.20.3 accelerate==0.21.0 sentencepiece==0.2.2"
             NODEPS="llava-torch==1.2.2.post1" ;;
  tf-4.57.6) PKGS="transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.0 accelerate==1.15.0"; NODEPS="" ;;
  *) echo "hf_venvs.sh: unknown venv '$NAME' (tf-4.37.2 or tf-4.57.6)" >&2; exit 2 ;;
esac

# Build $1 (a venv directory) with packages $2 (and $3 without their dependencies) on base venv $4, unless
# its marker says that exactly this was installed into it.
build() {
  local dir=$1 spec=$2 nodeps=$3 base=$4
  [ -f "$dir/.built" ] && [ "$(cat "$dir/.built")" = "$spec | $nodeps" ] && return 0
  echo "hf_venvs.sh: building $dir" >&2
  rm -rf "$dir"
  python3 -m venv "$dir"
  if [ -n "$base" ]; then
    "$base/bin/python" -c "import site; print(site.getsitepackages()[0])" \
      > "$("$dir/bin/python" -c "import site; print(site.getsitepackages()[0])")/_alphaclip_base.pth"
  fi
  # shellcheck disable=SC2086
  "$dir/bin/python" -m pip install -q $spec >&2
  # shellcheck disable=SC2086
  [ -z "$nodeps" ] || "$dir/bin/python" -m pip install -q --no-deps $nodeps >&2
  echo "$spec | $nodeps" > "$dir/.built"
}

BASE="$CACHE/base-torch-2.14.1"
build "$BASE" "$TORCH $BASE_PKGS" "" ""
build "$CACHE/$NAME" "$PKGS" "$NODEPS" "$BASE"
echo "$CACHE/$NAME/bin/python"
