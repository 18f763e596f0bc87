"""Aligned region preprocessing: an image and its regions go through the same geometry.

Geometry modes (all end at ``image_size x image_size``):

* ``"pad"`` (training default): pad to a square with zeros, the image centred, then resize;
* ``"crop"``: centre-crop the largest square, then resize (ImageNet-S evaluation);
* ``"squash"``: resize to the square, ignoring the aspect ratio.

Images resize bicubic, masks bilinear (both anti-aliased); the image is normalised with CLIP's
mean/std and the mask encoded as ``(m - 0.5) / 0.26``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .alpha import ALPHA_FOREGROUND, CLIP_MEAN, CLIP_STD, encode_alpha
from .images import check_pixels, open_image, pil_to_rgb
from .regions import Region, is_box, region_mask
from .resize import pad_resize

Mode = Literal["pad", "crop", "squash"]


@dataclass
class RegionBatch:
    """Model inputs for N (image, region) samples."""

    pixel_values: torch.Tensor  # [N, 3, S, S] CLIP-normalised RGB
    alpha: torch.Tensor  # [N, 1, S, S] encoded alpha
    image_index: torch.Tensor  # [N] index of each sample's image in the input list

    def rgba(self) -> torch.Tensor:
        """``[N, 4, S, S]``: the layout frameworks take (timm ``in_chans=4``, HF 4-channel ``pixel_values``)."""
        return torch.cat([self.pixel_values, self.alpha], dim=1)


def image_to_tensor(image: Any, max_pixels: Optional[int] = None) -> torch.Tensor:
    """A path, PIL, numpy ``[H, W, 3]`` (uint8 or float in [0, 1]) or torch ``[3, H, W]`` -> float ``[3, H, W]``
    in [0, 1]. Files are opened with EXIF orientation applied; images above ``max_pixels`` are refused."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image, limit=max_pixels)
    if hasattr(image, "convert"):  # PIL: alpha transparency is not a region, drop it; 16-bit grey is scaled
        check_pixels(image.height, image.width, max_pixels)
        image = np.array(pil_to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"a numpy image must be [H, W, 3] (or [H, W] grey); got shape {image.shape}")
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"a tensor image must be [3, H, W]; got shape {tuple(t.shape)}")
    else:
        raise ValueError(f"unsupported image type {type(image).__name__}; pass PIL, numpy [H, W, 3] or torch [3, H, W]")
    if t.shape[-1] == 0 or t.shape[-2] == 0:
        raise ValueError(f"the image is empty ({t.shape[-2]}x{t.shape[-1]} pixels)")
    check_pixels(int(t.shape[-2]), int(t.shape[-1]), max_pixels)
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if not t.is_floating_point():
        raise ValueError(f"image dtype {t.dtype} is not supported; pass uint8 (0-255) or float in [0, 1]")
    t = t.float()
    if torch.isnan(t).any():
        raise ValueError("the image contains NaN")
    if t.min() < 0 or t.max() > 1:
        raise ValueError(
            f"float image has values in [{t.min():.4g}, {t.max():.4g}]; pass floats in [0, 1] or uint8 "
            f"(pixels are normalised by the processor, not before it)"
        )
    return t


def _region_list(regions: Any) -> list:
    """One image's regions as a list: a lone region (a box as 4 numbers, a mask, a dict, None) is wrapped."""
    if isinstance(regions, (list, tuple)) and not is_box(regions):
        return list(regions)
    return [regions]


class RegionProcessor:
    """Turn images and regions into aligned ``pixel_values`` and ``alpha``.

    Args:
        image_size: side of the square model input.
        mode: geometry, ``"pad"``, ``"crop"`` or ``"squash"`` (see the module docstring).
        mean, std: RGB normalisation (OpenAI CLIP's by default).
        max_pixels: largest image accepted (``width * height``); None: ``$ALPHACLIP_MAX_PIXELS`` or 100M.
    """

    def __init__(
        self, image_size: int = 224, mode: Mode = "pad",
        mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, max_pixels: Optional[int] = None,
    ):
        if mode not in ("pad", "crop", "squash"):
            raise ValueError(f"mode must be 'pad', 'crop' or 'squash'; got {mode!r}")
        self.image_size, self.mode, self.max_pixels = image_size, mode, max_pixels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    # --- geometry, shared by image and masks -------------------------------------------------------
    def _square(self, t: torch.Tensor) -> torch.Tensor:
        H, W = t.shape[-2:]
        if self.mode == "pad":
            s = max(H, W)
            top, left = (s - H) // 2, (s - W) // 2
            return F.pad(t, (left, s - W - left, top, s - H - top))
        if self.mode == "crop":
            s = min(H, W)
            top, left = (H - s) // 2, (W - s) // 2
            return t[..., top : top + s, left : left + s]
        return t

    def _resize(self, t: torch.Tensor, mode: str) -> torch.Tensor:
        S = self.image_size
        if tuple(t.shape[-2:]) == (S, S):
            return t
        return F.interpolate(t[None], size=(S, S), mode=mode, antialias=True, align_corners=False)[0]

    def _fit(self, t: torch.Tensor, mode: str) -> torch.Tensor:
        """Square geometry then resize; padding never builds the full-resolution square (see ``resize.py``)."""
        if self.mode == "pad" and t.shape[-1] != t.shape[-2]:
            return pad_resize(t, self.image_size, mode)
        return self._resize(self._square(t), mode)

    # --- public API ------------------------------------------------------------------------------------
    def pixels(self, image: Any) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """One image -> (pixel_values ``[1, 3, S, S]``, its original ``(height, width)``)."""
        t = image_to_tensor(image, self.max_pixels)
        size = (int(t.shape[-2]), int(t.shape[-1]))
        t = self._fit(t, "bicubic").clamp_(0, 1)
        return ((t - self.mean) / self.std)[None], size

    def alphas(self, regions: Sequence[Region], size: Tuple[int, int]) -> torch.Tensor:
        """Regions of one image of ``size = (height, width)`` -> encoded alpha ``[R, 1, S, S]``."""
        S, out = self.image_size, []
        if len(regions) == 0:
            raise ValueError("no regions were given for an image; pass None (or [None]) for the whole image")
        for i, region in enumerate(regions):
            mask = region_mask(region, *size)
            if mask is None:
                out.append(torch.full((1, S, S), ALPHA_FOREGROUND))
                continue
            if not mask.any():
                raise ValueError(f"region {i} is empty: its mask covers no pixel of the {size[1]}x{size[0]} image; "
                                 f"pass None for the whole image, or a region with pixels inside")
            m = self._fit(torch.from_numpy(mask)[None], "bilinear").clamp_(0, 1)
            out.append(encode_alpha(m))
        return torch.stack(out)

    def __call__(self, images: Any, regions: Optional[Sequence[Any]] = None) -> RegionBatch:
        """Preprocess images with their regions.

        Args:
            images: one image, or a list of images.
            regions: for one image, a list of its regions (or one region); for a list of images, a list
                holding each image's region list. None = each image whole. See ``regions.py`` for the forms
                a region takes.

        Returns:
            One sample per (image, region), images repeated as views for their regions.
        """
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        if regions is None:
            regions = [[None] for _ in images]
        elif single:
            regions = [regions]
        if len(regions) != len(images):
            raise ValueError(f"got {len(images)} images but regions for {len(regions)}; pass one region list per image")
        pixels: List[torch.Tensor] = []
        alphas: List[torch.Tensor] = []
        index: List[int] = []
        for i, (image, regs) in enumerate(zip(images, regions)):
            px, size = self.pixels(image)
            a = self.alphas(_region_list(regs), size)
            pixels.append(px.expand(a.shape[0], -1, -1, -1))
            alphas.append(a)
            index += [i] * a.shape[0]
        return RegionBatch(torch.cat(pixels), torch.cat(alphas), torch.tensor(index, dtype=torch.long))
