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
from typing import Any, List, Mapping, Optional, Sequence

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

    if isinstance(rings, (str, bytes, Mapping)) or not isinstance(rings, (list, tuple, np.ndarray)):
        raise ValueError(f"a polygon is a flat list [x0, y0, x1, y1, ...] (or a list of them); got {type(rings).__name__}")
    if len(rings) == 0:
        raise ValueError("the polygon is empty; a polygon needs at least 3 (x, y) points")
    if _is_number(rings[0]):
        rings = [rings]
    try:
        rings = [np.asarray(r, np.float64).ravel() for r in rings]
    except (TypeError, ValueError):
        raise ValueError("polygon points must be numbers: [x0, y0, x1, y1, ...] (or a list of such rings)") from None
    for r in rings:
        if r.size < 6 or r.size % 2:
            raise ValueError(f"a polygon needs at least 3 (x, y) points as a flat list; got {r.size} numbers")
        xs, ys = r[0::2], r[1::2]
        if not np.isfinite(r).all() or xs.min() < 0 or ys.min() < 0 or xs.max() > width or ys.max() > height:
            raise ValueError(f"polygon points lie outside the {width}x{height} image (or are not finite)")
    rle = mask_utils.merge(mask_utils.frPyObjects([r.tolist() for r in rings], height, width))
    return mask_utils.decode(rle).astype(np.float32)


def _rle_string_counts(text: str) -> List[int]:
    """COCO's compressed RLE string -> run lengths (6-bit groups, 5 data bits each, runs after the second
    stored as differences to the run two before)."""
    counts: List[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise ValueError("the compressed RLE string ends in the middle of a run length")
            c = ord(text[pos]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"the compressed RLE string holds {text[pos]!r}, which is not an RLE character")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and c & 0x10:
                value |= -1 << shift  # sign extension
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_mask(rle: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Decode a COCO RLE (compressed string or uncompressed count list), after checking it describes exactly
    ``height x width`` pixels with non-negative runs (a bad RLE is an error, never a guessed region)."""
    try:
        size = [int(s) for s in rle.get("size", ())]
    except (TypeError, ValueError):
        size = []
    if size != [height, width]:
        raise ValueError(f"RLE has size {rle.get('size')} but the image is [{height}, {width}] (height, width)")
    counts: Any = rle.get("counts")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", "replace")
    if isinstance(counts, str):
        counts = _rle_string_counts(counts)
    elif isinstance(counts, (list, tuple)) and all(_is_number(c) and float(c) == int(c) for c in counts):
        counts = [int(c) for c in counts]
    else:
        raise ValueError("RLE counts must be a COCO compressed string or a list of whole numbers")
    if any(c < 0 for c in counts):
        raise ValueError(f"RLE counts hold a negative run ({min(counts)}); the RLE is corrupt")
    if sum(counts) != height * width:
        raise ValueError(f"RLE runs cover {sum(counts)} pixels but the image has {height}x{width} = "
                         f"{height * width}; the RLE is corrupt or belongs to another image")
    # Runs alternate background/foreground, starting with background, in column-major (Fortran) order.
    values = np.arange(len(counts), dtype=np.int64) % 2
    return np.repeat(values.astype(np.float32), counts).reshape(width, height).T.copy()


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
