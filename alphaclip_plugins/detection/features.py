"""Dense feature maps of the vision tower at a power-of-two stride, for any patch size (framework-free).

Feature pyramids (ViTDet's simple feature pyramid, FPN heads, anchors, RoI poolers) need power-of-two
strides. A patch-16 or patch-8 tower gives them directly. A patch-14 tower (ViT-L/14, L/14@336, H/14) is
run on the input padded at the bottom/right to a multiple of 14, and each stride-14 map is resampled to
stride 16 with its pixel geometry kept exact: output cell ``j`` (centre ``16 j + 8`` px) reads the stride-14
map at ``(16 j + 8) / 14 - 0.5`` cells (bilinear). The map then has exactly ``H/16 x W/16`` cells.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..core.vision import VisionTransformer


def default_stride(patch_size: int, out_stride: int = 0) -> int:
    """The stride of the maps: ``out_stride`` if given (> 0), else the patch size when it is a power of two
    (8, 16, 32: the tower's own grid) and 16 otherwise (ViTDet's stride for patch-14 towers).

    Raises:
        ValueError: an ``out_stride`` that is not a power of two.
    """
    if out_stride:
        if out_stride < 1 or out_stride & (out_stride - 1):
            raise ValueError(f"out_stride must be a power of two (8, 16, 32...) or 0 for automatic; got {out_stride}")
        return out_stride
    return patch_size if patch_size & (patch_size - 1) == 0 else 16


def to_stride(feat: torch.Tensor, patch_size: int, stride: int, out_hw: Sequence[int]) -> torch.Tensor:
    """Resample a patch-grid map ``[B, C, h, w]`` (stride ``patch_size``) to ``stride``, cropped to ``out_hw``.

    Returns:
        ``[B, C, out_hw[0], out_hw[1]]``; ``feat`` itself when the strides agree and no crop is needed.
    """
    if patch_size != stride:
        # scale_factor (not size) keeps the exact pixel geometry of both grids; see the module docstring.
        feat = F.interpolate(feat, scale_factor=patch_size / stride, mode="bilinear", align_corners=False,
                             recompute_scale_factor=False)
    return feat[..., : out_hw[0], : out_hw[1]]


def dense_features(
    tower: VisionTransformer, x: torch.Tensor, indices: Sequence[int], norm: bool = False, out_stride: int = 0,
    alpha: Optional[torch.Tensor] = None,
) -> List[torch.Tensor]:
    """Block outputs of ``tower`` as maps of stride :func:`default_stride` (``tower.forward_intermediates``).

    Args:
        x: ``[B, 3 or 4, H, W]``, H and W multiples of the stride (detection inputs are padded to that).
        indices: the blocks to return.
        norm: apply ``ln_post`` to the maps.

    Returns:
        one ``[B, width, H/stride, W/stride]`` map per index.
    """
    patch = tower.patch_size
    stride = default_stride(patch, out_stride)
    H, W = x.shape[-2:]
    ph, pw = (-H) % patch, (-W) % patch
    if ph or pw:  # only where the stride is not the patch size: detection inputs are multiples of the stride
        x = F.pad(x, (0, pw, 0, ph))
    out = tower.forward_intermediates(x, alpha, indices=indices, norm=norm, output_fmt="NCHW", intermediates_only=True)
    if stride == patch and not (ph or pw):
        return out
    return [to_stride(f, patch, stride, (H // stride, W // stride)) for f in out]
