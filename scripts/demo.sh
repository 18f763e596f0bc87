#!/usr/bin/env bash
# The main job: classify one selected region of examples/shapes.png with the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
alphaclip classify examples/shapes.png --mask examples/shapes_mask.png "$@"
