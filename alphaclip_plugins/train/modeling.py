"""The model side of training: building and freezing, LoRA, the module DDP wraps, cached text features."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.factory import create_model, tokenize
from ..core.model import AlphaCLIP
from .config import TrainConfig


def text_parameters(model: AlphaCLIP) -> List[nn.Parameter]:
    """The text tower's parameters (everything outside ``visual`` but the logit scale)."""
    return [p for n, p in model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]


def build_model(cfg: TrainConfig, device: torch.device) -> AlphaCLIP:
    """Create the model and set what trains: the paper recipe freezes the text tower and the logit scale."""
    m = cfg.model
    model = create_model(m.name, m.pretrained, m.alpha_checkpoint, seed=cfg.seed, **m.overrides)
    model.to(device).train()
    if model.cfg.text is None:
        raise ValueError(f"{m.name} has no text tower; training needs a two-tower architecture")
    for p in text_parameters(model):
        p.requires_grad_(m.train_text)
    if cfg.loss.freeze_logit_scale:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.loss.logit_scale))
        model.logit_scale.requires_grad_(False)
    model.set_grad_checkpointing(m.grad_checkpointing)
    if m.lora_rank > 0:
        model.visual = add_lora(model.visual, m.lora_rank, m.lora_alpha, m.lora_targets)
    return model


def add_lora(visual: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> nn.Module:
    """Freeze the vision tower and add LoRA adapters (``peft``) to ``targets``; ``conv1_alpha`` still trains fully.

    Raises:
        ImportError: peft is not installed.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("LoRA training needs peft: pip install 'alphaclip-plugins[train]'") from e
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    wrapped = get_peft_model(visual, config)
    wrapped.get_base_model().conv1_alpha.weight.requires_grad_(True)
    return wrapped


def merge_lora(model: AlphaCLIP) -> AlphaCLIP:
    """Fold LoRA adapters into the vision weights, leaving a plain core model (in place)."""
    if hasattr(model.visual, "merge_and_unload"):
        model.visual = model.visual.merge_and_unload()
    return model


class Encoder(nn.Module):
    """The trained part of Alpha-CLIP as one module, which DDP or FSDP wraps.

    With a frozen text tower it holds only the vision tower (the only part whose gradients need syncing);
    with ``train_text`` it holds the whole model.
    """

    def __init__(self, model: AlphaCLIP, train_text: bool):
        super().__init__()
        self.train_text = train_text
        if train_text:
            self.clip = model
        else:
            self.visual = model.visual

    def forward(
        self, pixel_values: torch.Tensor, alpha: Optional[torch.Tensor], tokens: Optional[torch.Tensor] = None,
        inverse: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Normalised features.

        Args:
            pixel_values: ``[B, 3, S, S]``; alpha: ``[B, 1, S, S]`` or None (whole images).
            tokens: ``[U, L]`` token ids of the distinct captions (only with ``train_text``).
            inverse: ``[B]`` row of each sample's caption in ``tokens``.

        Returns:
            ``(image [B, D], text [B, D] or None)``.
        """
        if not self.train_text:
            return F.normalize(self.visual(pixel_values, alpha), dim=-1), None
        image = self.clip.encode_image(pixel_values, alpha, normalize=True)
        if tokens is None:
            return image, None
        text = self.clip.encode_text(tokens, normalize=True)
        return image, text[inverse] if inverse is not None else text


def distinct(captions: Sequence[str]) -> Tuple[List[str], torch.Tensor]:
    """Distinct captions in order of first appearance, and each caption's index among them ``[B]``."""
    index: "OrderedDict[str, int]" = OrderedDict()
    inverse = [index.setdefault(c, len(index)) for c in captions]
    return list(index), torch.tensor(inverse, dtype=torch.long)


class TextFeatureCache:
    """Normalised features of a frozen text tower, computed once per distinct caption (LRU-bounded).

    New captions are encoded in chunks of exactly ``chunk`` rows (padded with repeats), so a caption's
    features do not depend on which other captions happened to be new in the same step: a resumed run
    rebuilds bit-identical features.

    Args:
        model: the model whose text tower is frozen.
        chunk: rows per encoder call (the micro-batch size is a good choice).
        max_entries: captions kept; the least recently used are dropped first.
    """

    def __init__(self, model: AlphaCLIP, chunk: int, max_entries: int = 1_000_000):
        self.model, self.chunk, self.max_entries = model, max(chunk, 1), max_entries
        self.features: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.encoded = 0  # captions encoded so far (a cache-efficiency figure)

    @torch.no_grad()
    def _encode(self, captions: List[str]) -> None:
        device = self.model.token_embedding.weight.device
        for i in range(0, len(captions), self.chunk):
            part = captions[i : i + self.chunk]
            padded = part + [part[0]] * (self.chunk - len(part))
            with torch.autocast(device.type, enabled=False):
                feats = self.model.encode_text(tokenize(padded).to(device), normalize=True).float()
            for caption, f in zip(part, feats):
                self.features[caption] = f
            self.encoded += len(part)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """``[B, D]`` features of ``captions`` (rows in order)."""
        new = [c for c in dict.fromkeys(captions) if c not in self.features]
        if new:
            self._encode(new)
        for c in captions:
            self.features.move_to_end(c)
        out = torch.stack([self.features[c] for c in captions])
        while len(self.features) > self.max_entries:
            self.features.popitem(last=False)
        return out
