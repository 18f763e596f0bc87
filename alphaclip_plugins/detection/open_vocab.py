"""Open-vocabulary detection pieces shared by the detection integrations (MMDetection, Detectron2).

* :class:`ZeroShotClassifier`: a box classifier whose class weights are Alpha-CLIP text embeddings;
* :class:`RegionScorer`, :func:`rescore_detections` and :class:`DetectionRescorer`: encode the full
  image with each detected box (or mask) as alpha and fuse the result with the detector's score, as
  ViLD / F-VLM do;
* :func:`swap_vocabulary`: point a built detector at other classes.

The integrations only translate their frameworks' boxes, images and configs to these.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.factory import resolve_model
from ..core.processor import Mode, RegionProcessor
from ..core.zeroshot import Templates, load_text_embeddings, save_text_embeddings, text_classifier


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


def rescore_detections(
    scorer: RegionScorer, image: Any, regions: Sequence[Any], labels: torch.Tensor, scores: torch.Tensor,
    novel: Optional[torch.Tensor] = None, alpha_base: float = 0.35, beta_novel: float = 0.65,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fuse Alpha-CLIP into the scores of N detections of one image.

    Args:
        image: the image the regions are in (``[3, H, W]`` in [0, 1], PIL or numpy).
        regions: N boxes ``xyxy`` (clip them with :func:`clip_boxes`) or masks, in that image's pixels.
        labels, scores: ``[N]`` the detector's class and score per detection.

    Returns:
        ``(fused scores [N], Alpha-CLIP probabilities [N, K])``.
    """
    clip = scorer(image, regions).to(scores.device)
    if len(regions) == 0:
        return scores, clip
    rows = torch.arange(len(regions), device=scores.device)
    det = torch.zeros_like(clip)
    det[rows, labels] = scores.float()
    fused = fuse_scores(det, clip, novel, alpha_base, beta_novel)
    return fused[rows, labels].to(scores.dtype), clip


def cached_text_embeddings(
    path: Union[str, Path], class_names: Optional[Sequence[str]] = None, clip: Any = "default",
    templates: Templates = "ovseg",
) -> Tuple[torch.Tensor, list]:
    """``(embeddings [K, D], labels)`` read from ``path``; computed with ``clip`` and written there if missing."""
    path = Path(path)
    if path.exists():
        emb, labels = load_text_embeddings(path)
        if class_names is not None and list(class_names) != labels:
            raise ValueError(f"{path} holds embeddings of other classes ({labels[:5]}...); delete it to recompute")
        return emb, labels
    if class_names is None:
        raise FileNotFoundError(f"{path} does not exist; pass class_names (and clip) to compute it")
    return save_text_embeddings(resolve_model(clip), class_names, path, templates), list(class_names)


class ZeroShotClassifier(nn.Module):
    """Box classifier whose class weights are Alpha-CLIP text embeddings, plus a learned background.

    ``scores = logit_scale * cos(proj(x), [text_1..K; background])``: ``[N, K + 1]``, background last,
    as MMDetection's and Detectron2's box heads expect. The vocabulary can be swapped at inference.

    Args:
        in_features: box feature size.
        out_features: classes + 1 (background); must agree with the embedding file.
        text_embeddings: file written by ``save_text_embeddings`` (computed here if missing).
        class_names, clip, templates: what to compute that file from.
        logit_scale: inverse temperature of the cosine logits.
    """

    def __init__(
        self, in_features: int, out_features: int, text_embeddings: Union[str, Path],
        class_names: Optional[Sequence[str]] = None, clip: Any = "default", templates: Templates = "ovseg",
        logit_scale: float = 50.0,
    ):
        super().__init__()
        emb, labels = cached_text_embeddings(text_embeddings, class_names, clip, templates)
        if out_features != len(labels) + 1:
            raise ValueError(f"{text_embeddings} holds {len(labels)} classes but the head has "
                             f"{out_features - 1}; make the head's number of classes agree")
        self.proj = nn.Linear(in_features, emb.shape[1])
        self.background = nn.Parameter(torch.randn(emb.shape[1]) * 0.02)
        self.register_buffer("text_embeddings", F.normalize(emb.float(), dim=-1), persistent=False)
        self.logit_scale = logit_scale
        self.labels = labels

    def set_vocabulary(self, embeddings: torch.Tensor, labels: Sequence[str]) -> None:
        if embeddings.shape[1] != self.proj.out_features:
            raise ValueError(f"embeddings have dim {embeddings.shape[1]} but the classifier {self.proj.out_features}")
        self.text_embeddings = F.normalize(embeddings.float(), dim=-1).to(self.proj.weight.device)
        self.labels = list(labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.proj(x.flatten(1)), dim=-1)
        weights = torch.cat([self.text_embeddings, F.normalize(self.background, dim=0)[None]])  # [K + 1, D]
        return self.logit_scale * x @ weights.T


def swap_classifier_vocabulary(model: nn.Module, text_embeddings: Union[str, Path]) -> Tuple[list, int]:
    """Point every :class:`ZeroShotClassifier` inside ``model`` at the classes of ``text_embeddings``.

    Returns:
        ``(labels, number of classifiers swapped)``; the caller updates its framework's class counts.
    """
    emb, labels = load_text_embeddings(text_embeddings)
    classifiers = [m for m in model.modules() if isinstance(m, ZeroShotClassifier)]
    for m in classifiers:
        m.set_vocabulary(emb, labels)
    return labels, len(classifiers)


class DetectionRescorer:
    """Alpha-CLIP re-scoring of a detector's predictions: a :class:`RegionScorer`, the classes the detector
    never trained on, and the fusion weights. Detection adapters hold one as ``rescorer``.

    Args:
        scorer: scores regions against the detector's vocabulary (in its label order).
        novel_classes: names the detector never trained on (weighted by ``beta_novel``).
        alpha_base, beta_novel: weight of Alpha-CLIP in the geometric mean for base / novel classes.
    """

    def __init__(self, scorer: RegionScorer, novel_classes: Sequence[str] = (), alpha_base: float = 0.35,
                 beta_novel: float = 0.65):
        self.scorer, self.alpha_base, self.beta_novel = scorer, alpha_base, beta_novel
        self.novel_classes = set(novel_classes)

    def set_vocabulary(self, labels: Sequence[str], novel_classes: Sequence[str] = ()) -> None:
        self.scorer.set_vocabulary(labels)
        self.novel_classes = set(novel_classes)

    @torch.no_grad()
    def __call__(
        self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
        masks: Optional[Sequence[Any]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(fused scores [N], Alpha-CLIP probabilities [N, K])`` of N detections in ``image [3, H, W]``
        (RGB in [0, 1]); ``boxes [N, 4]`` ``xyxy`` in that image's pixels, or ``masks`` to score instead."""
        h, w = image.shape[-2:]
        regions = list(masks) if masks is not None else clip_boxes(boxes, h, w)
        novel = torch.tensor([name in self.novel_classes for name in self.scorer.labels], dtype=torch.bool)
        return rescore_detections(self.scorer, image, regions, labels, scores, novel, self.alpha_base,
                                  self.beta_novel)


def swap_vocabulary(
    model: nn.Module, text_embeddings: Union[str, Path], novel_classes: Sequence[str] = (),
    heads: Callable[[nn.Module], bool] = lambda m: False,
) -> list:
    """Point a built detector at the classes of ``text_embeddings``, in place.

    Every :class:`ZeroShotClassifier` gets the new class embeddings, every module ``heads`` selects gets
    the new ``num_classes``, and every ``rescorer`` (:class:`DetectionRescorer`) the new labels.

    Returns:
        The new labels.

    Raises:
        ValueError: the model has neither a zero-shot classifier nor a re-scorer.
    """
    labels, found = swap_classifier_vocabulary(model, text_embeddings)
    for module in model.modules():
        if heads(module):
            module.num_classes = len(labels)
        rescorer = getattr(module, "rescorer", None)
        if isinstance(rescorer, DetectionRescorer):
            rescorer.set_vocabulary(labels, novel_classes)
            found += 1
    if not found:
        raise ValueError("the detector has no ZeroShotClassifier or Alpha-CLIP re-scorer whose vocabulary to swap")
    return labels
