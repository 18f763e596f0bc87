"""Alpha-CLIP as transformers models: CLIP's classes with an alpha patch embedding.

Each class subclasses its CLIP counterpart and changes only what alpha needs:

* :class:`AlphaCLIPVisionEmbeddings` adds ``patch_embedding_alpha`` (``Conv2d(1, hidden, patch, patch)``,
  zero-initialised) whose output is added to the patch tokens before the positional embedding;
* the models accept alpha as a 4th channel of ``pixel_values`` or as ``alpha_values``.

A 3-channel input is the whole image (alpha +1.9231 everywhere). With a zero alpha conv every class
computes exactly what its CLIP parent computes, and stock CLIP checkpoints load with only
``patch_embedding_alpha.weight`` newly initialised. Module layout and state-dict keys are the installed
release's (``CLIPVisionModel`` is flat on 5.x and wraps ``vision_model`` on 4.x); :func:`vision_body` finds a
tower's layers on any.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from transformers import CLIPModel, CLIPTextModel, CLIPVisionModel, CLIPVisionModelWithProjection
from transformers.models.clip.modeling_clip import CLIPPreTrainedModel, CLIPVisionEmbeddings

from ...core.vision import embed_alpha, split_rgba
from . import compat
from .configuration import AlphaCLIPConfig, AlphaCLIPVisionConfig


def merge_alpha(pixel_values: Optional[torch.Tensor], alpha_values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The one ``pixel_values`` layout the models pass around: RGB ``[B, 3, H, W]`` or RGBA ``[B, 4, H, W]``.

    Args:
        pixel_values: ``[B, 3, H, W]`` CLIP-normalised RGB, or ``[B, 4, H, W]`` with encoded alpha last.
        alpha_values: ``[B, 1, H, W]`` (or ``[B, H, W]``) encoded alpha for 3-channel ``pixel_values``; None
            keeps the input as it is. An RGB batch of 1 is shared by a batch of alphas (one image, B regions).

    Returns:
        ``pixel_values`` unchanged, or ``[B, 4, H, W]`` with ``alpha_values`` appended.

    Raises:
        ValueError: for a channel count other than 3 or 4, alpha given twice, or shapes that do not match.
    """
    if alpha_values is None or pixel_values is None:
        if alpha_values is not None:
            raise ValueError("got alpha_values without pixel_values; pass both")
        return pixel_values
    rgb, alpha = split_rgba(pixel_values, alpha_values)
    rgb = rgb.expand(alpha.shape[0], -1, -1, -1)  # one image shared by many regions
    return torch.cat([rgb, alpha.to(rgb.dtype)], dim=1)


class AlphaCLIPVisionEmbeddings(CLIPVisionEmbeddings):
    """CLIP's patch, class and position embeddings, plus ``patch_embedding_alpha`` for the alpha channel."""

    def __init__(self, config: AlphaCLIPVisionConfig):
        super().__init__(config)
        self.patch_embedding_alpha = nn.Conv2d(1, self.embed_dim, self.patch_size, self.patch_size, bias=False)
        nn.init.zeros_(self.patch_embedding_alpha.weight)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """``[B, 3 or 4, H, W]`` -> tokens ``[B, 1 + H/p * W/p, hidden]`` (class token first)."""
        rgb, alpha = split_rgba(pixel_values, None)
        embeddings = super().forward(rgb, **compat.interpolation(interpolate_pos_encoding))
        # [B, hidden, h, w] (or [1, hidden, 1, 1] for the whole image) -> [B, h*w, hidden]
        alpha_embeds = embed_alpha(self.patch_embedding_alpha, alpha).flatten(2).transpose(1, 2)
        # Adding after the positional embedding equals adding before it: only the patch tokens change.
        patches = embeddings[:, 1:] + alpha_embeds.to(embeddings.dtype)
        return torch.cat([embeddings[:, :1], patches], dim=1)


def vision_body(model: nn.Module) -> nn.Module:
    """The module holding a vision tower's ``embeddings``, ``encoder`` and layer norms, in any of the models.

    That is the tower itself on transformers 5 (``AlphaCLIPVisionModel`` is flat there) and its
    ``vision_model`` on 4.x; the ``vision_model`` of the projection and two-tower models on both.
    """
    while not hasattr(model, "embeddings"):
        if not hasattr(model, "vision_model"):
            raise TypeError(f"{type(model).__name__} holds no CLIP vision tower (no `embeddings` or `vision_model`)")
        model = model.vision_model
    return model


class _ZeroAlphaInit:
    """A fresh (or a stock CLIP checkpoint's) alpha conv is zero: the model then computes what CLIP computes."""

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # type: ignore[misc]
        if isinstance(module, AlphaCLIPVisionEmbeddings):
            compat.zeros_(module.patch_embedding_alpha.weight)


class AlphaCLIPVisionModel(_ZeroAlphaInit, CLIPVisionModel):
    """:class:`~transformers.CLIPVisionModel` with an alpha-aware patch embedding.

    ``forward(pixel_values, alpha_values=None, ...)`` returns what ``CLIPVisionModel`` returns:
    ``last_hidden_state [B, 1 + N, hidden]`` (before ``post_layernorm``), ``pooler_output [B, hidden]``
    and, on request, ``hidden_states`` / ``attentions``.
    """

    config_class = AlphaCLIPVisionConfig
    config: AlphaCLIPVisionConfig
    _no_split_modules = [*(CLIPVisionModel._no_split_modules or []), "AlphaCLIPVisionEmbeddings"]

    def __init__(self, config: AlphaCLIPVisionConfig):
        super().__init__(config)
        vision_body(self).embeddings = AlphaCLIPVisionEmbeddings(config)
        self.post_init()

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        interpolate_pos_encoding: Optional[bool] = False,
        alpha_values: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """Args as ``CLIPVisionModel.forward``; ``pixel_values [B, 3 or 4, H, W]``, ``alpha_values [B, 1, H, W]``."""
        pixel_values = merge_alpha(pixel_values, alpha_values)
        return super().forward(pixel_values, **compat.interpolation(interpolate_pos_encoding), **kwargs)


class AlphaCLIPVisionModelWithProjection(_ZeroAlphaInit, CLIPVisionModelWithProjection):
    """:class:`~transformers.CLIPVisionModelWithProjection` around an :class:`AlphaCLIPVisionModel`.

    ``image_embeds [B, projection_dim]`` is Alpha-CLIP's image embedding (not normalised).
    """

    config_class = AlphaCLIPVisionConfig
    config: AlphaCLIPVisionConfig

    def __init__(self, config: AlphaCLIPVisionConfig):
        CLIPPreTrainedModel.__init__(self, config)
        self.vision_model = compat.inner(AlphaCLIPVisionModel._from_config(config))
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        interpolate_pos_encoding: bool = False,
        alpha_values: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """Args as ``CLIPVisionModelWithProjection.forward``, plus ``alpha_values [B, 1, H, W]``."""
        pixel_values = merge_alpha(pixel_values, alpha_values)
        return super().forward(pixel_values, **compat.interpolation(interpolate_pos_encoding), **kwargs)


class AlphaCLIPModel(_ZeroAlphaInit, CLIPModel):
    """:class:`~transformers.CLIPModel` whose image tower is an :class:`AlphaCLIPVisionModel`.

    ``forward(input_ids, pixel_values, alpha_values=None)`` gives ``logits_per_image [B_img, B_text]``:
    zero-shot classification of each region against the texts.
    """

    config_class = AlphaCLIPConfig
    config: AlphaCLIPConfig

    def __init__(self, config: AlphaCLIPConfig):
        CLIPPreTrainedModel.__init__(self, config)
        text_config, vision_config = config.text_config, config.vision_config
        self.projection_dim = config.projection_dim
        self.text_embed_dim = text_config.hidden_size
        self.vision_embed_dim = vision_config.hidden_size
        self.text_model = compat.inner(CLIPTextModel._from_config(text_config))
        self.vision_model = compat.inner(AlphaCLIPVisionModel._from_config(vision_config))
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        alpha_values: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """Projected image features ``[B, projection_dim]`` of RGB(A) images and regions.

        Returned as the installed ``CLIPModel.get_image_features`` returns them: a tensor on 4.x, an output
        whose ``pooler_output`` they are on 5.x.
        """
        pixel_values = merge_alpha(pixel_values, alpha_values)
        return super().get_image_features(pixel_values, **compat.interpolation(interpolate_pos_encoding), **kwargs)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        return_loss: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        alpha_values: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """Args as ``CLIPModel.forward``, plus ``alpha_values [B, 1, H, W]`` (or a 4-channel ``pixel_values``)."""
        return super().forward(
            input_ids=input_ids, pixel_values=merge_alpha(pixel_values, alpha_values), attention_mask=attention_mask,
            position_ids=position_ids, return_loss=return_loss, **compat.interpolation(interpolate_pos_encoding), **kwargs,
        )
