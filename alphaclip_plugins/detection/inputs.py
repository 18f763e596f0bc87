"""The alpha plane of a detection sample, and the pixel statistics detection pipelines normalise with."""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import numpy as np

from ..core.alpha import ALPHA_MEAN, ALPHA_STD, CLIP_MEAN, CLIP_STD
from ..core.regions import region_mask

#: CLIP's RGB statistics and alpha's 0.5/0.26 on the 0-255 scale of detection pipelines (R, G, B, alpha).
RGBA_MEAN_255 = tuple(255 * m for m in CLIP_MEAN + (ALPHA_MEAN,))
RGBA_STD_255 = tuple(255 * s for s in CLIP_STD + (ALPHA_STD,))
#: The encoded value of background alpha on that scale, for padding: (0 - mean) / std.
ALPHA_BACKGROUND_255 = (0.0 - RGBA_MEAN_255[3]) / RGBA_STD_255[3]

AlphaSource = Literal["whole", "boxes", "masks", "prompt"]
SOURCES = ("whole", "boxes", "masks", "prompt")
#: The COCO-JSON field of an image's alpha prompt (``images[i]["alpha_prompt"]``), and the sample key it
#: becomes in both frameworks: a box ``[x0, y0, x1, y1]`` or ``{"box": [...]}`` in pixels, a polygon
#: ``{"polygon": [x0, y0, ...]}`` (or a list of rings), a COCO RLE ``{"size": [h, w], "counts": ...}``, or
#: ``null`` (none: an error for the ``"prompt"`` source unless its fallback is the whole image).
PROMPT_KEY = "alpha_prompt"


def missing_prompt_error(image: Any, loader: str, fallback: str) -> ValueError:
    """The error of a ``"prompt"`` alpha source meeting a sample without a prompt."""
    return ValueError(
        f"the alpha source is 'prompt' but {image} has no {PROMPT_KEY!r}; give every image one in the COCO "
        f"JSON (images[i][{PROMPT_KEY!r}]: a box [x0, y0, x1, y1], {{'polygon': [...]}} or an RLE) and load it "
        f"with {loader}, or use {fallback} to take the whole image where none is given")


def sample_alpha(
    source: AlphaSource, height: int, width: int, boxes: Optional[np.ndarray] = None,
    masks: Optional[Sequence[Any]] = None, prompt: Any = None,
) -> np.ndarray:
    """The region of one detection sample as a float mask ``[H, W]`` in [0, 1], before any transform.

    Args:
        source: ``"whole"`` (all foreground), ``"boxes"`` / ``"masks"`` (the union of the sample's
            annotations: referring-style prompts), or ``"prompt"`` (``prompt``: a box ``xyxy``, a mask, a
            polygon or an RLE in image pixels). A source with nothing to draw from is the whole image.
        boxes: ``[N, 4]`` ``xyxy`` in pixels; each is clipped into the image and kept at least one pixel.
        masks: N regions (binary masks, ``{"polygon": ...}`` or RLE dicts).

    Raises:
        ValueError: an unknown ``source``.
    """
    if source not in SOURCES:
        raise ValueError(f"alpha source must be one of {SOURCES}; got {source!r}")
    mask = np.zeros((height, width), np.float32)
    if source == "boxes" and boxes is not None and len(boxes):
        for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
            x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
            x1, y1 = max(min(x1, width), x0 + 1), max(min(y1, height), y0 + 1)
            mask = np.maximum(mask, region_mask([x0, y0, x1, y1], height, width))
        return mask
    if source == "masks" and masks is not None and len(masks):
        for region in masks:
            mask = np.maximum(mask, region_mask(region, height, width))
        return mask
    if source == "prompt" and prompt is not None:
        return region_mask(prompt, height, width)
    return np.ones((height, width), np.float32)
