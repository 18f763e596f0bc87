"""Free scenes: shapes anywhere in images of any aspect ratio, so that a model learns the shapes, not a layout.

:func:`.synthetic.draw_image` puts shapes of 16-24 px on the 8 px patch grid of a 64 px square, apart from
each other; a model trained on it knows the shapes only there. :func:`draw_scene` draws what a user's picture
of the same classes looks like: any position, sizes from ``min_frac`` to ``max_frac`` of the short side,
images of several sizes and aspect ratios (the processor pads them to a square, so shapes shrink with the
aspect ratio), colours jittered around their names' values, background greys, pixel noise, and shapes that
partly cover earlier ones. Masks are the visible pixels of each shape; boxes enclose them.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from ..core.regions import polygon_mask
from .synthetic import COLOURS, SHAPES, SIZES, SceneConfig, Shape, SyntheticImage, _outline


def _canvas(rng: np.random.Generator, cfg: SceneConfig) -> Tuple[int, int]:
    """``(width, height)``: the long side from ``[min_side, max_side]``, a random orientation and aspect."""
    long = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    if rng.random() < cfg.square:
        return long, long
    short = max(int(round(long / math.exp(rng.uniform(0.0, math.log(cfg.max_aspect))))), 8)
    return (long, short) if rng.random() < 0.5 else (short, long)


def _try_place(
    rng: np.random.Generator, d: int, width: int, height: int, visible: List[np.ndarray], full: List[int],
    overlap: bool, max_covered: float, name: str,
) -> Optional[Tuple[List[float], np.ndarray]]:
    """An outline and mask for a ``d``-pixel shape that keeps every earlier shape visible enough, or None."""
    for _ in range(60):
        x0, y0 = rng.uniform(0, width - d), rng.uniform(0, height - d)
        polygon = [float(v) for p in _outline(name, x0, y0, d) for v in p]
        mask = polygon_mask(polygon, height, width).astype(bool)
        if mask.sum() < 4:
            continue
        grown = mask if overlap else _dilate(mask)
        ok = all(
            (v & ~grown).sum() >= (1.0 - max_covered) * n if overlap else not (v & grown).any()
            for v, n in zip(visible, full)
        )
        if ok:
            return polygon, mask
    return None


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel (shapes that stay apart keep a gap of background)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= out[:, :-1].copy()
    out[:, :-1] |= out[:, 1:].copy()
    return out


def draw_scene(
    rng: np.random.Generator, cfg: SceneConfig, size: Optional[Tuple[int, int]] = None
) -> SyntheticImage:
    """Draw one free scene with ``min_shapes``-``max_shapes`` shapes of distinct (colour, shape) classes.

    Args:
        size: ``(width, height)`` of the image; None draws it from ``cfg`` (:func:`_canvas`).

    Returns:
        The image (RGB, ``width x height`` from :func:`_canvas`), its shapes in drawing order (later shapes
        lie on top) and one uint8 ``{0, 1}`` mask ``[H, W]`` per shape: the shape's visible pixels.
    """
    width, height = size if size is not None else _canvas(rng, cfg)
    short = min(width, height)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    count = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    picks = rng.choice(len(classes), size=count, replace=False)
    grey = int(rng.integers(cfg.min_grey, cfg.max_grey + 1))
    pixels = np.full((height, width, 3), grey, dtype=np.float32)
    drawn: List[Tuple[str, str, float, List[float]]] = []
    visible: List[np.ndarray] = []
    full: List[int] = []
    for k in range(count):
        colour, name = classes[int(picks[k])]
        frac = rng.uniform(cfg.min_frac, cfg.max_frac)
        d = max(int(round(frac * short)), 4)
        placed = _try_place(rng, min(d, short - 1), width, height, visible, full, rng.random() < cfg.overlap,
                            cfg.max_covered, name)
        if placed is None:
            continue
        polygon, mask = placed
        for v in visible:
            v &= ~mask
        jitter = rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, 3)
        rgb = np.clip(np.array(COLOURS[colour], np.float32) + jitter, 0, 255)
        pixels[mask] = rgb
        drawn.append((colour, name, frac, polygon))
        visible.append(mask)
        full.append(int(mask.sum()))
    if not drawn:  # cannot happen for sane configs: the first shape always fits an empty canvas
        raise ValueError(f"no shape of {cfg.min_frac}-{cfg.max_frac} of a {width}x{height} image could be placed")
    pixels += rng.normal(0.0, rng.uniform(0.0, cfg.noise), pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    shapes, masks = [], []
    span = max(cfg.max_frac - cfg.min_frac, 1e-6)
    for (colour, name, frac, polygon), v, n in zip(drawn, visible, full):
        ys, xs = np.nonzero(v)
        size = SIZES[min(int((frac - cfg.min_frac) / span * len(SIZES)), len(SIZES) - 1)]
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        shapes.append(Shape(colour, name, size, box, polygon, occluded=int(v.sum()) < n))
        masks.append(v.astype(np.uint8))
    return SyntheticImage(image, shapes, masks)
