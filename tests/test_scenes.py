"""The free-scene generator draws what its config says: sizes, aspect ratios, visible masks, limited overlap."""
from __future__ import annotations

import numpy as np

from alphaclip_plugins.core.regions import polygon_mask
from alphaclip_plugins.train.scenes import draw_scene
from alphaclip_plugins.train.synthetic import COLOURS, SceneConfig, SyntheticConfig, iter_samples


def test_scenes_vary_in_size_and_aspect_and_keep_shapes_visible():
    cfg = SceneConfig(overlap=1.0, noise=0.0, colour_jitter=0)
    sizes, covered = set(), 0
    for i in range(40):
        scene = draw_scene(np.random.default_rng([7, i]), cfg)
        w, h = scene.image.size
        sizes.add((w, h))
        assert cfg.min_side <= max(w, h) <= cfg.max_side and max(w, h) / min(w, h) <= cfg.max_aspect + 0.02
        pixels = np.asarray(scene.image)
        taken = np.zeros((h, w), bool)
        for shape, mask in zip(scene.shapes, scene.masks):
            m = mask.astype(bool)
            assert not (taken & m).any()  # masks are visible pixels: no pixel belongs to two shapes
            taken |= m
            assert (pixels[m] == COLOURS[shape.colour]).all()  # no jitter, no noise: exactly the colour
            x0, y0, x1, y1 = shape.box
            ys, xs = np.nonzero(m)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            full = polygon_mask(shape.polygon, h, w).astype(bool).sum()
            assert m.sum() >= (1 - cfg.max_covered) * full - 1
            covered += shape.occluded
    assert len({w == h for w, h in sizes}) == 2 and len(sizes) > 20  # square and not, many sizes
    assert covered > 0  # overlap happens


def test_covered_shapes_are_never_given_as_polygons():
    cfg = SyntheticConfig(num_images=60, region_format="mixed", scene=SceneConfig(overlap=1.0))
    kinds = set()
    for _, img, samples in iter_samples(cfg):
        for shape, sample in zip(img.shapes, samples):
            kinds.add(next(iter(sample["region"])))
            assert not (shape.occluded and "polygon" in sample["region"])
    assert kinds == {"rle", "polygon", "box", "mask"}
