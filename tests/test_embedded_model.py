"""The shipped shapes model names shapes drawn anywhere, by code that shares nothing with its training data.

The scenes are drawn here with PIL's ImageDraw (its own rasteriser, colour values and placement) on
non-square canvases that the processor pads to a square, at sizes and positions the old on-grid
generator never produced.
"""
from __future__ import annotations

import random
from typing import List, Tuple

import numpy as np
import pytest
from PIL import Image, ImageDraw

from alphaclip_plugins import classify_regions
from alphaclip_plugins.core.zeroshot import text_classifier
from alphaclip_plugins.train.default_model import default_labels, load_default_model

SEED = 20261201
MASK_MIN = BOX_MIN = 0.925  # measured: mask 0.975, box 1.0 with this seed; 0.975-1.0 with seeds 1-6

RGB = {"red": (225, 40, 45), "green": (35, 165, 55), "blue": (35, 80, 210), "yellow": (240, 200, 40),
       "purple": (150, 60, 180)}


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, d: int, fill) -> None:
    if shape == "circle":
        draw.ellipse([x, y, x + d - 1, y + d - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x, y, x + d - 1, y + d - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x + d / 2, y), (x + d - 1, y + d - 1), (x, y + d - 1)], fill=fill)
    else:  # cross: two bars a third of the side wide
        t = d // 3
        draw.rectangle([x + t, y, x + d - 1 - t, y + d - 1], fill=fill)
        draw.rectangle([x, y + t, x + d - 1, y + d - 1 - t], fill=fill)


def _scene(rnd: random.Random, size: Tuple[int, int]) -> Tuple[Image.Image, List[np.ndarray], List[str]]:
    """Four shapes of distinct classes at random places, apart, on a random grey; their masks and labels."""
    w, h = size
    grey = rnd.randint(60, 190)
    image = Image.new("RGB", size, (grey, grey, grey))
    classes = rnd.sample([(c, s) for c in RGB for s in ("circle", "square", "triangle", "cross")], 4)
    taken: List[Tuple[int, int, int, int]] = []
    masks, names = [], []
    for colour, shape in classes:
        for _ in range(500):
            d = rnd.randint(26, 46)
            x, y = rnd.randint(0, w - d), rnd.randint(0, h - d)
            if all(x + d + 3 <= a or c + 3 <= x or y + d + 3 <= b or e + 3 <= y for a, b, c, e in taken):
                break
        else:
            continue
        taken.append((x, y, x + d, y + d))
        _draw(ImageDraw.Draw(image), shape, x, y, d, RGB[colour])
        mask = Image.new("L", size, 0)
        _draw(ImageDraw.Draw(mask), shape, x, y, d, 255)
        masks.append(np.asarray(mask) > 0)
        names.append(f"{colour} {shape}")
    return image, masks, names


def _box(mask: np.ndarray) -> List[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.fixture(scope="module")
def scored():
    """Mask, box and whole-image hits over 10 scenes (40 regions) on 150x110 and 100x140 canvases."""
    model, labels = load_default_model(), default_labels()
    classifier = text_classifier(model, labels)
    rnd = random.Random(SEED)
    hits = {"mask": [], "box": [], "whole": []}
    for i in range(10):
        image, masks, names = _scene(rnd, (150, 110) if i % 2 == 0 else (100, 140))
        probs = classify_regions(model, image, masks + [_box(m) for m in masks] + [None], labels,
                                 classifier=classifier)
        pred = [labels[j] for j in probs.argmax(dim=-1).tolist()]
        n = len(names)
        for k, name in enumerate(names):
            hits["mask"].append(pred[k] == name)
            hits["box"].append(pred[n + k] == name)
            hits["whole"].append(pred[-1] == name)
    return {k: (float(np.mean(v)), len(v)) for k, v in hits.items()}


def test_the_scenes_hold_enough_regions(scored):
    assert scored["mask"][1] >= 36  # a packing failure would quietly shrink the test


def test_the_shipped_model_names_masked_shapes_drawn_anywhere(scored):
    assert scored["mask"][0] >= MASK_MIN, scored


def test_the_shipped_model_names_boxed_shapes_drawn_anywhere(scored):
    assert scored["box"][0] >= BOX_MIN, scored


def test_the_region_not_the_image_decides(scored):
    # Each image holds four classes: the whole image can name at most one of them.
    assert scored["whole"][0] <= 0.4 < scored["mask"][0], scored
