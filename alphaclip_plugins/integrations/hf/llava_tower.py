"""``AlphaCLIPVisionTower``: the original LLaVA code base's ``CLIPVisionTower``, alpha-aware.

The LLaVA repository (``llava.model.multimodal_encoder``) builds its image tower in ``builder.py``.
Swapping the class there is the only change it needs::

    # llava/model/multimodal_encoder/builder.py, in build_vision_tower (was: CLIPVisionTower):
    return AlphaCLIPVisionTower(vision_tower, args=vision_tower_cfg, **kwargs)

with ``from alphaclip_plugins.integrations.hf import AlphaCLIPVisionTower`` at the top, and the Alpha-CLIP
weights named by the config's ``mm_alpha_clip_checkpoint`` (or ``alpha_checkpoint=...``). The tower then
takes RGBA images (``[B, 4, H, W]`` or a list of ``[4, H, W]``) made by its ``image_processor``
(``image_processor.preprocess(image, regions=mask, return_tensors="pt")``); 3-channel images still
work and mean the whole image. The llava package is not imported here. See ``docs/llava.md``.
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Union

import torch
from torch import nn

from ...core.io import PathLike
from .configuration import AlphaCLIPVisionConfig
from .export import load_alpha_weights
from .modeling import AlphaCLIPVisionModel
from .processing import AlphaCLIPImageProcessor

logger = logging.getLogger(__name__)

Images = Union[torch.Tensor, List[torch.Tensor]]


class AlphaCLIPVisionTower(nn.Module):
    """LLaVA's image tower interface over :class:`AlphaCLIPVisionModel`.

    Args:
        vision_tower: a CLIP or Alpha-CLIP model directory or Hub name (``openai/clip-vit-large-patch14-336``),
            as LLaVA's ``mm_vision_tower``. Stock CLIP weights load with a zero alpha conv.
        args: LLaVA's model config or training arguments; reads ``mm_vision_select_layer``,
            ``mm_vision_select_feature`` (``"patch"`` or ``"cls_patch"``), ``unfreeze_mm_vision_tower`` and,
            when ``alpha_checkpoint`` is not given, ``mm_alpha_clip_checkpoint``.
        delay_load: read only the config now; :meth:`load_model` loads the weights later (LLaVA's builder).
        alpha_checkpoint: Alpha-CLIP vision weights loaded over ``vision_tower`` (any layout, e.g. the
            official ``.pth`` files), or None.
    """

    def __init__(self, vision_tower: str, args: Any, delay_load: bool = False,
                 alpha_checkpoint: Optional[PathLike] = None):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.alpha_checkpoint = alpha_checkpoint or getattr(args, "mm_alpha_clip_checkpoint", None)
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature must be 'patch' or 'cls_patch'; got {self.select_feature!r}")
        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            self.load_model()
        else:
            self.cfg_only = AlphaCLIPVisionConfig.from_pretrained(vision_tower)

    def load_model(self, device_map: Any = None) -> None:
        """Load the tower (frozen) and its image processor; a second call does nothing."""
        if self.is_loaded:
            logger.info("%s is already loaded; load_model() skipped", self.vision_tower_name)
            return
        self.vision_tower = AlphaCLIPVisionModel.from_pretrained(self.vision_tower_name, device_map=device_map)
        if self.alpha_checkpoint is not None:
            load_alpha_weights(self.vision_tower, self.alpha_checkpoint)
        self.image_processor = AlphaCLIPImageProcessor(image_size=self.vision_tower.config.image_size)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    def feature_select(self, image_forward_outs: Any) -> torch.Tensor:
        """Tokens of layer ``select_layer``: ``[B, N, hidden]`` (``"patch"``) or ``[B, 1 + N, hidden]``."""
        features = image_forward_outs.hidden_states[self.select_layer]
        return features[:, 1:] if self.select_feature == "patch" else features

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return self.feature_select(out).to(images.dtype)

    def forward(self, images: Images) -> Union[torch.Tensor, List[torch.Tensor]]:
        """RGBA images -> features.

        Args:
            images: ``[B, 4, H, W]`` (RGB + encoded alpha, from ``image_processor``), or a list of ``[4, H, W]``;
                3 channels mean the whole image.

        Returns:
            ``[B, N, hidden]``, or a list of ``[1, N, hidden]`` for a list input.
        """
        # The frozen tower runs without autograd, as LLaVA's; an unfrozen one (unfreeze_mm_vision_tower) with it.
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(grad):
            if isinstance(images, (list, tuple)):
                return [self._encode(image.unsqueeze(0)) for image in images]
            return self._encode(images)

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self) -> AlphaCLIPVisionConfig:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2
