"""A simple feature pyramid (ViTDet style): strides 4/8/16/32 from a plain ViT's single stride-16 map."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, H, W] -> [B, H, W, C] -> norm -> back
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _rescale(dim: int, scale: float) -> Tuple[nn.Module, int]:
    """Resampling layers for one pyramid level and the channel count they leave."""
    if scale == 4.0:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
        ), dim // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(2, stride=2), dim
    raise ValueError(f"scale factor {scale} is not supported; use 4.0, 2.0, 1.0 or 0.5")


def pyramid_strides(in_stride: int, scale_factors: Sequence[float], num_outs: int) -> List[int]:
    """Output strides of the pyramid, checked: whole powers of two, each twice the previous.

    Raises:
        ValueError: naming the strides, e.g. a stride-14 map (patch 14 without ``out_stride`` 16) gives 3.5.
    """
    strides = [in_stride / float(s) for s in scale_factors]
    strides += [strides[-1] * 2 ** (i + 1) for i in range(num_outs - len(strides))]
    ok = all(s == int(s) and int(s) & (int(s) - 1) == 0 for s in strides)
    if not ok or any(b != 2 * a for a, b in zip(strides, strides[1:])):
        raise ValueError(f"a stride-{in_stride} map with scale factors {tuple(scale_factors)} gives strides "
                         f"{strides}; they must be log2-contiguous powers of two: give the backbone a "
                         f"power-of-two out_stride (16) and the neck the same in_stride")
    return [int(s) for s in strides]


@MODELS.register_module()
class SimpleFeaturePyramid(BaseModule):
    """Multi-scale maps from the last backbone map: up-/down-sample, then 1x1 and 3x3 convs with LayerNorm.

    Args:
        in_channels: channels of the backbone map (the ViT width).
        out_channels: channels of every output level.
        scale_factors: resampling per level relative to the input map.
        num_outs: number of outputs; levels past ``len(scale_factors)`` are max-pooled (stride 2) from the
            last one, as Faster R-CNN's RPN expects five levels.
        in_stride: stride of the backbone map (``AlphaCLIPViT.out_stride``: 16 for patch 16 and 14).
            ``self.strides`` are the output strides; they must be whole, log2-contiguous powers of two.
    """

    def __init__(
        self, in_channels: int = 768, out_channels: int = 256, scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        num_outs: int = 5, in_stride: int = 16, init_cfg=None,
    ):
        super().__init__(init_cfg=init_cfg)
        if num_outs < len(scale_factors):
            raise ValueError(f"num_outs {num_outs} is fewer than the {len(scale_factors)} scale factors")
        self.num_outs = num_outs
        self.strides = pyramid_strides(in_stride, scale_factors, num_outs)
        self.stages = nn.ModuleList()
        for scale in scale_factors:
            resample, dim = _rescale(in_channels, float(scale))
            self.stages.append(nn.Sequential(
                resample,
                nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels),
            ))

    def forward(self, inputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        x = inputs[-1]
        outs: List[torch.Tensor] = [stage(x) for stage in self.stages]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)
