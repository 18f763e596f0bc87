"""``AlphaCLIPViT``: the core vision tower as an MMDetection backbone."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from mmdet.registry import MODELS
from mmengine.model import BaseModule

from ...core.checkpoint import load_checkpoint
from ...core.vision import feature_tower
from ...detection.features import default_stride, dense_features


@MODELS.register_module()
class AlphaCLIPViT(BaseModule):
    """Alpha-CLIP ViT returning per-block feature maps ``[B, width, H/s, W/s]``, ``s = self.out_stride``.

    Input is ``[B, 4, H, W]`` (RGB + alpha) or ``[B, 3, H, W]`` (whole image). Any input size that is a
    multiple of the stride works: the positional embedding is resampled. The stride is the patch size for
    patch 8/16/32 and 16 for patch-14 towers (:mod:`alphaclip_plugins.detection.features`).

    Args:
        arch: core architecture name (``"ViT-B/16"``, ``"ViT-L/14"``, ``"tiny"``...).
        out_indices: blocks whose outputs are returned (negative counts from the end).
        norm_out: apply the tower's final LayerNorm to the outputs.
        frozen: freeze the whole tower and keep it in eval mode (frozen CLIP backbones, as in F-VLM).
        frozen_stages: -1 none; 0 the stem; k the stem and the first k blocks.
        with_cp: gradient checkpointing of the blocks.
        window_size: > 0: attention in windows of that many patches a side, except in ``global_blocks``
            (ViTDet: 14 and ``(2, 5, 8, 11)``); 0 = global attention in every block.
        global_blocks: blocks that keep global attention when ``window_size`` > 0.
        out_stride: stride of the outputs; 0 = automatic (see above).
        init_cfg: ``dict(type="Pretrained", checkpoint=PATH)`` with PATH in any layout the core loader
            reads (official Alpha-CLIP ``.pth``, OpenAI, open_clip, Hugging Face, timm).
        **overrides: vision config fields, e.g. ``image_size=336``.
    """

    def __init__(
        self, arch: str = "ViT-B/16", out_indices: Sequence[int] = (-1,), norm_out: bool = False,
        frozen: bool = False, frozen_stages: int = -1, with_cp: bool = False, window_size: int = 0,
        global_blocks: Sequence[int] = (), out_stride: int = 0, init_cfg: Optional[dict] = None, **overrides: Any,
    ):
        super().__init__(init_cfg=init_cfg)
        self.visual = feature_tower(arch, frozen, frozen_stages, with_cp, norm_out, window_size=window_size,
                                    global_blocks=global_blocks, **overrides)
        self.out_indices = [i % self.visual.cfg.layers for i in out_indices]
        self.norm_out = norm_out
        self.out_stride = default_stride(self.visual.patch_size, out_stride)

    def init_weights(self) -> None:
        """Load a ``Pretrained`` init_cfg through the core loader; it can run any number of times."""
        cfg = self.init_cfg if isinstance(self.init_cfg, dict) else None
        if cfg is not None and cfg.get("type") == "Pretrained":
            load_checkpoint(self.visual, cfg["checkpoint"], strict=cfg.get("strict", True))
            self._is_init = True
            return
        super().init_weights()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(dense_features(self.visual, x, self.out_indices, self.norm_out, self.out_stride))
