"""The two-tower Alpha-CLIP model, laid out exactly as OpenAI CLIP's ``CLIP`` (plus ``visual.conv1_alpha``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig
from .transformer import LayerNorm, Transformer, init_transformer_
from .vision import VisionTransformer


class AlphaCLIP(nn.Module):
    """Alpha-CLIP: a region-aware image tower and CLIP's text tower.

    Parameter names are OpenAI CLIP's (``visual.*``, ``token_embedding``, ``transformer.*``,
    ``ln_final``, ``text_projection``, ``logit_scale``) plus ``visual.conv1_alpha.weight``.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        t = cfg.text
        self.visual = VisionTransformer(cfg.vision)
        self.context_length = t.context_length
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_dim, t.act, t.ln_eps)
        self.ln_final = LayerNorm(t.width, eps=t.ln_eps)
        self.text_projection = nn.Parameter(torch.empty(t.width, t.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=t.width**-0.5)
        init_transformer_(self.transformer)

    def encode_image(
        self, image: torch.Tensor, alpha: Optional[torch.Tensor] = None, normalize: bool = False
    ) -> torch.Tensor:
        """Image embedding.

        Args:
            image: ``[B, 3, H, W]`` CLIP-normalised RGB, or ``[B, 4, H, W]`` with encoded alpha last.
            alpha: ``[B, 1, H, W]`` encoded alpha (see ``encode_alpha``); None = whole image. With an image
                batch of 1, alpha may hold many regions of that one image.
            normalize: L2-normalise the output.

        Returns:
            ``[B, embed_dim]``.
        """
        x = self.visual(image, alpha)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embedding of token ids ``[B, context_length]`` -> ``[B, embed_dim]``."""
        if text.shape[-1] > self.context_length:
            raise ValueError(f"text has {text.shape[-1]} tokens; this model takes at most {self.context_length}")
        dtype = self.text_projection.dtype
        x = self.token_embedding(text).to(dtype) + self.positional_embedding[: text.shape[-1]].to(dtype)
        x = self.ln_final(self.transformer(x, is_causal=True))
        # Pool at the end-of-text token, which has the largest id in CLIP's vocabulary.
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        x = x @ self.text_projection.to(x.dtype)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, alpha: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns normalised image features, normalised text features and ``logit_scale.exp()``."""
        return (
            self.encode_image(image, alpha, normalize=True),
            self.encode_text(text, normalize=True),
            self.logit_scale.exp(),
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self) -> set:
        return {"visual." + n for n in self.visual.no_weight_decay()} | {"positional_embedding", "logit_scale"}
