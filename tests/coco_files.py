"""The tiny synthetic COCO instance set the detection tests train on, written by the tests (one writer).

Used by the ViTDet config tests and by the frameworks' own tools runs (``tools/train.py``, ``tools/test.py``,
``train_net.py``) of every detection config.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASSES = ("square", "bar", "block")


def synthetic_coco(root: Path, count: int = 4) -> Path:
    """``count`` textured 96 x 128 images with 2 filled rectangles each, as a COCO instances file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        pixels = rng.integers(0, 80, (96, 128, 3), dtype=np.uint8)
        for j in range(2):
            x0, y0 = int(rng.integers(4, 70)), int(rng.integers(4, 40))
            w, h = int(rng.integers(20, 50)), int(rng.integers(20, 50))
            pixels[y0:y0 + h, x0:x0 + w] = rng.integers(150, 255, 3)
            poly = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=1 + (i + j) % 3,
                                    bbox=[x0, y0, w, h], area=w * h, segmentation=[poly], iscrowd=0))
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        images.append(dict(id=i + 1, file_name=f"{i}.png", width=128, height=96))
    categories = [dict(id=k + 1, name=n) for k, n in enumerate(CLASSES)]
    path = root / "instances.json"
    path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return path

