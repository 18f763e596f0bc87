"""Regions -> binary masks at the image's resolution: masks, boxes, polygons, COCO RLE.

A region is one of:

* a 2-D mask (bool, uint8 0/1 or 0-255, float in [0, 1]; numpy, torch or PIL);
* a box ``(x0, y0, x1, y1)`` in pixels (four numbers), or ``{"box": [x0, y0, x1, y1]}``;
* ``{"polygon": [x0, y0, x1, y1, ...]}`` or a list of such rings (COCO ``segmentation``);
* a COCO RLE ``{"size": [h, w], "counts": ...}`` (compressed or not), or ``{"rle": {...}}``;
* None: the whole image.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .alpha import mask_to_float

Region = Any  # see the module docstring


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def is_box(region: Any) -> bool:
    """Four numbers ``(x0, y0, x1, y1)``: a box (a mask is 2-D, so this is never ambiguous)."""
    return isinstance(region, (list, tuple)) and len(region) == 4 and all(_is_number(v) for v in region)


def box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """Pixels covered by ``box = (x0, y0, x1, y1)`` (floor of the start, ceil of the end)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box {tuple(box)} has a non-finite coordinate")
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"box (x0, y0, x1, y1) = {(x0, y0, x1, y1)} is empty or outside the {width}x{height} image; "
            f"expected 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} (clip it to the image first)"
        )
    mask = np.zeros((height, width), np.float32)
    mask[int(math.floor(y0)) : int(math.ceil(y1)), int(math.floor(x0)) : int(math.ceil(x1))] = 1.0
    return mask


def polygon_mask(rings: Sequence[Any], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (``[x0, y0, x1, y1, ...]`` or a list of them) with pycocotools."""
    from pycocotools import mask as mask_utils

    if len(rings) and _is_number(rings[0]):
        rings = [rings]
    rings = [np.asarray(r, np.float64).ravel() for r in rings]
    for r in rings:
        if r.size < 6 or r.size % 2:
            raise ValueError(f"a polygon needs at least 3 (x, y) points as a flat list; got {r.size} numbers")
        xs, ys = r[0::2], r[1::2]
        if not np.isfinite(r).all() or xs.min() < 0 or ys.min() < 0 or xs.max() > width or ys.max() > height:
            raise ValueError(f"polygon points lie outside the {width}x{height} image (or are not finite)")
    rle = mask_utils.merge(mask_utils.frPyObjects([r.tolist() for r in rings], height, width))
    return mask_utils.decode(rle).astype(np.float32)


def rle_mask(rle: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Decode a COCO RLE (compressed string or uncompressed count list)."""
    from pycocotools import mask as mask_utils

    size = [int(s) for s in rle.get("size", ())]
    if size != [height, width]:
        raise ValueError(f"RLE has size {size} but the image is [{height}, {width}] (height, width)")
    if isinstance(rle["counts"], list):  # uncompressed
        rle = mask_utils.frPyObjects(dict(rle), height, width)
    try:
        return mask_utils.decode(dict(rle)).astype(np.float32)
    except Exception as e:
        raise ValueError(f"could not decode the RLE: {e}") from e


def region_mask(region: Region, height: int, width: int) -> Optional[np.ndarray]:
    """One region -> float32 mask ``[height, width]`` in [0, 1], or None for the whole image.

    Raises:
        ValueError: a mask of another size, a box/polygon outside the image, a bad RLE, NaN, a float
            mask outside [0, 1], or something that is not a region.
    """
    if region is None:
        return None
    if isinstance(region, Mapping):
        if "counts" in region:
            return rle_mask(region, height, width)
        if len(region) == 1:
            (kind, value), = region.items()
            if kind == "box":
                return box_mask(value, height, width)
            if kind == "polygon":
                return polygon_mask(value, height, width)
            if kind == "rle":
                return rle_mask(value, height, width)
            if kind == "mask":
                return region_mask(value, height, width)
        raise ValueError(
            f"unknown region dict with keys {sorted(region)}; use {{'box': ...}}, {{'polygon': ...}}, "
            f"{{'rle': ...}}, {{'mask': ...}} or a COCO RLE with 'size' and 'counts'"
        )
    if is_box(region):
        return box_mask(region, height, width)
    mask = mask_to_float(region)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D [height, width]; got shape {mask.shape}")
    if mask.shape != (height, width):
        raise ValueError(
            f"mask has shape {mask.shape} but the image is ({height}, {width}); "
            f"pass a mask of the image's height and width"
        )
    return mask
