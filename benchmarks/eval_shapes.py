"""How well the embedded shapes model names regions, per kind of scene, prompted as ``alphaclip classify`` does.

    python benchmarks/eval_shapes.py                  # the shipped model, 150 held-out images per condition
    python benchmarks/eval_shapes.py --model runs/x/final --images 50

Each condition draws its own held-out images (seeds no training set uses). Every shape is classified over
the model's labels (OVSeg prompt ensemble, pad geometry) three ways: with its mask, with its box, and with
the whole image (the baseline: one answer per image, scored against each of its shapes). Prints a
Markdown table of top-1 accuracies.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Tuple

import numpy as np

from alphaclip_plugins import classify_regions
from alphaclip_plugins.core.factory import model_labels, resolve_model
from alphaclip_plugins.core.zeroshot import text_classifier
from alphaclip_plugins.train.scenes import draw_scene
from alphaclip_plugins.train.synthetic import SceneConfig, SyntheticImage, draw_image

Draw = Callable[[np.random.Generator], SyntheticImage]

#: name -> (what it holds, how to draw one image). Seeds 1000+ are never used for training data.
CONDITIONS: Dict[str, Tuple[str, Draw]] = {
    "off-grid": ("64x64, 4 shapes of 16-24 px anywhere, apart",
                 lambda r: draw_image(r, 64, 4, 16, 24, grid=1)),
    "small": ("64x64, 4 shapes of 10-14 px anywhere, apart",
              lambda r: draw_image(r, 64, 4, 10, 14, grid=1)),
    "non-square": ("128x96, 2-5 shapes of 20-45% of the short side (19-43 px), apart",
                   lambda r: draw_scene(r, SceneConfig(min_frac=0.2, overlap=0.0), size=(128, 96))),
    "overlapping": ("48-128 px, aspect <= 1.5, 2-5 shapes of 10-45% of the short side, each may cover <= 30% "
                    "of earlier ones", lambda r: draw_scene(r, SceneConfig(overlap=1.0))),
    "on-grid": ("64x64, 4 shapes of 16-24 px on the 8 px grid (the old generator)",
                lambda r: draw_image(r, 64, 4, 16, 24, grid=8)),
}


def evaluate(model, labels: List[str], draw: Draw, images: int, seed: int) -> Dict[str, float]:
    """Top-1 of mask, box and whole-image prompts over every shape of ``images`` drawn images."""
    classifier = text_classifier(model, labels)
    hits = {"mask": 0, "box": 0, "whole": 0}
    regions = 0
    for i in range(images):
        scene = draw(np.random.default_rng([seed, i]))
        prompts = [m for m in scene.masks] + [list(s.box) for s in scene.shapes] + [None]
        probs = classify_regions(model, scene.image, prompts, labels, classifier=classifier)
        pred = probs.argmax(dim=-1).tolist()
        n = len(scene.shapes)
        for k, shape in enumerate(scene.shapes):
            target = labels.index(shape.label)
            hits["mask"] += pred[k] == target
            hits["box"] += pred[n + k] == target
            hits["whole"] += pred[-1] == target
        regions += n
    return {**{k: v / regions for k, v in hits.items()}, "regions": regions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="a save_pretrained folder (default: the embedded model)")
    parser.add_argument("--images", type=int, default=150, help="images per condition")
    parser.add_argument("--seed", type=int, default=1000, help="first seed; condition j uses seed + j")
    args = parser.parse_args()
    model = resolve_model(args.model).eval()
    labels = model_labels() if args.model == "default" else model_labels(args.model)
    if not labels:
        parser.error(f"{args.model} holds no labels; export it with export.labels set")
    print("| condition | scenes | regions | mask top-1 | box top-1 | whole image | chance |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    start = time.time()
    for j, (name, (what, draw)) in enumerate(CONDITIONS.items()):
        r = evaluate(model, labels, draw, args.images, args.seed + j)
        print(f"| {name} | {what} | {r['regions']} | {r['mask']:.3f} | {r['box']:.3f} | {r['whole']:.3f} | "
              f"{1 / len(labels):.3f} |", flush=True)
    print(f"\n{args.images} images per condition, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
