"""Open-vocabulary re-scoring of detections: encode the full image with each box (or mask) as alpha.

Shared by the detection integrations (MMDetection, Detectron2): they pass boxes in image pixels and
their detector's class scores; this module does the Alpha-CLIP side and the score fusion of ViLD/F-VLM.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .processor import Mode, RegionProcessor
from .zeroshot import Templates, text_classifier


def fuse_scores(
    det: torch.Tensor, clip: torch.Tensor, novel: Optional[torch.Tensor] = None,
    alpha_base: float = 0.35, beta_novel: float = 0.65,
) -> torch.Tensor:
    """Geometric mean of detector and Alpha-CLIP class scores, weighted per class group.

    ``det^(1 - w) * clip^w`` with ``w = alpha_base`` for base classes and ``beta_novel`` for novel ones
    (the detector saw base classes in training, so it is trusted more there).

    Args:
        det: ``[N, K]`` detector probabilities.
        clip: ``[N, K]`` Alpha-CLIP probabilities.
        novel: ``[K]`` bool, True for classes unseen by the detector; None = all base.
    """
    if det.shape != clip.shape:
        raise ValueError(f"detector scores {tuple(det.shape)} and Alpha-CLIP scores {tuple(clip.shape)} differ")
    w = torch.full((clip.shape[-1],), alpha_base, dtype=clip.dtype, device=clip.device)
    if novel is not None:
        w = torch.where(novel.to(clip.device), torch.full_like(w, beta_novel), w)
    return det.clamp_min(0) ** (1 - w) * clip.clamp_min(0) ** w


class RegionScorer:
    """Score regions of an image against a vocabulary with Alpha-CLIP.

    The vocabulary can be swapped at any time (:meth:`set_vocabulary`); class embeddings are cached.

    Args:
        model: an ``AlphaCLIP`` (two towers).
        labels: class names.
        templates: prompt set (``"ovseg"``, ``"clip"`` or a list of ``"... {} ..."``).
        mode: geometry of the full image and its alpha (pad-to-square keeps every box inside).
        batch_size: regions encoded per forward.
    """

    def __init__(
        self, model: nn.Module, labels: Sequence[str], templates: Templates = "ovseg", mode: Mode = "pad",
        batch_size: int = 64,
    ):
        self.model, self.templates, self.batch_size = model, templates, batch_size
        self.processor = RegionProcessor(model.visual.cfg.image_size, mode)
        self.set_vocabulary(labels)

    def set_vocabulary(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self.weights = text_classifier(self.model, self.labels, self.templates)  # [K, D]

    @torch.no_grad()
    def __call__(self, image: Any, regions: Sequence[Any]) -> torch.Tensor:
        """Probabilities ``[N, K]`` over the vocabulary for N regions (boxes ``xyxy`` in pixels, masks...)."""
        if len(regions) == 0:
            return torch.empty(0, len(self.labels))
        pixels, size = self.processor.pixels(image)
        device = self.model.logit_scale.device
        pixels = pixels.to(device)
        out = []
        for i in range(0, len(regions), self.batch_size):
            alpha = self.processor.alphas(list(regions[i : i + self.batch_size]), size).to(device)
            feats = self.model.encode_image(pixels, alpha, normalize=True).float()
            out.append((self.model.logit_scale.exp().float() * feats @ self.weights.T.to(device)).softmax(-1))
        return torch.cat(out).cpu()


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> list:
    """Detector boxes ``[N, 4]`` -> lists clipped into the image (detectors may overshoot by a pixel)."""
    b = boxes.detach().float().cpu().clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, width)
    b[:, 1::2] = b[:, 1::2].clamp(0, height)
    # a degenerate box still gets one pixel, so every detection is scored
    b[:, 2] = torch.maximum(b[:, 2], (b[:, 0] + 1).clamp(max=width))
    b[:, 0] = torch.minimum(b[:, 0], b[:, 2] - 1)
    b[:, 3] = torch.maximum(b[:, 3], (b[:, 1] + 1).clamp(max=height))
    b[:, 1] = torch.minimum(b[:, 1], b[:, 3] - 1)
    return b.tolist()
