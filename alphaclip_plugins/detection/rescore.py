"""Alpha-CLIP re-scoring of detections (ViLD / F-VLM style), framework-free.

Two ways to show the scorer a region (``region_mode``): ``"alpha"`` (Alpha-CLIP: the whole image, the
region as alpha) and ``"crop"`` (the usual CLIP approach, for comparison: the region's bounding box cut
out of the image, seen whole). Cost: every region is one pass through the ViT (its alpha changes the patch embedding), so the work is
bounded first: the detector's top ``topk`` detections per image are kept, their regions are encoded in
batches across all the images of a batch (the RGB patch embedding is computed once per image), then the
scores are fused, sorted, thresholded and cut to ``max_per_img``, in that order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..core.processor import Mode, RegionProcessor, image_to_tensor
from ..core.regions import region_mask
from ..core.vision import VisionTransformer, prepare_alpha
from ..core.zeroshot import Templates, text_classifier


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


def encode_regions(visual: VisionTransformer, rgb: torch.Tensor, index: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Embeddings of regions of several images, sharing each image's RGB patch embedding.

    Equals ``visual(pixels[index], alpha)`` (the tower's forward) without re-embedding an image per region.

    Args:
        rgb: ``[I, C, h, w]`` ``visual.conv1`` of the I images.
        index: ``[R]`` the image of each region.
        alpha: ``[R, 1, S, S]`` encoded alpha of the regions.

    Returns:
        ``[R, embed_dim]``, not normalised.
    """
    grid = rgb[index] + visual.conv1_alpha(prepare_alpha(alpha, visual.conv1_alpha.weight.dtype)).to(rgb.dtype)
    return visual.encode_grid(grid)


RegionMode = Literal["alpha", "crop"]


def crop_region(image: torch.Tensor, region: Any) -> torch.Tensor:
    """The bounding box of ``region`` (a box, mask, polygon...) cut out of ``image [3, H, W]``: ``[3, h, w]``.

    Raises:
        ValueError: the region covers no pixel of the image.
    """
    H, W = image.shape[-2:]
    mask = region_mask(region, H, W)
    if mask is None:
        return image
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError(f"the region covers no pixel of the {W}x{H} image; pass a region with pixels inside")
    return image[:, int(ys.min()) : int(ys.max()) + 1, int(xs.min()) : int(xs.max()) + 1]


class RegionScorer:
    """Score regions of images against a vocabulary with Alpha-CLIP.

    The vocabulary can be swapped at any time (:meth:`set_vocabulary`); class embeddings are cached.

    Args:
        model: an ``AlphaCLIP`` (two towers).
        labels: class names.
        templates: prompt set (``"ovseg"``, ``"clip"`` or a list of ``"... {} ..."``).
        mode: geometry of the full image and its alpha (pad-to-square keeps every box inside).
        batch_size: regions encoded per forward, across images.
        region_mode: ``"alpha"``: the whole image with the region as alpha (Alpha-CLIP); ``"crop"``: the
            region's bounding box cropped and seen whole (alpha everywhere foreground), the usual CLIP
            re-scoring, same model.
    """

    def __init__(
        self, model: nn.Module, labels: Sequence[str], templates: Templates = "ovseg", mode: Mode = "pad",
        batch_size: int = 64, region_mode: RegionMode = "alpha",
    ):
        if region_mode not in ("alpha", "crop"):
            raise ValueError(f"region_mode must be 'alpha' (region as alpha) or 'crop' (region cropped); "
                             f"got {region_mode!r}")
        self.model, self.templates, self.batch_size = model, templates, batch_size
        self.region_mode = region_mode
        self.processor = RegionProcessor(model.visual.cfg.image_size, mode)
        self.set_vocabulary(labels)

    def set_vocabulary(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self.weights = text_classifier(self.model, self.labels, self.templates)  # [K, D]

    @torch.no_grad()
    def __call__(self, image: Any, regions: Sequence[Any]) -> torch.Tensor:
        """Probabilities ``[N, K]`` over the vocabulary for N regions (boxes ``xyxy`` in pixels, masks...)."""
        return self.score_batch([image], [regions])[0]

    @torch.no_grad()
    def score_batch(self, images: Sequence[Any], regions: Sequence[Sequence[Any]]) -> List[torch.Tensor]:
        """Probabilities ``[N_i, K]`` for the N_i regions of each image; all regions share the forwards."""
        device = self.model.logit_scale.device
        visual = self.model.visual
        index, alphas, pixels = self._inputs(images, regions)
        counts = [len(rs) for rs in regions]
        if not pixels:
            return [torch.empty(0, len(self.labels)) for _ in counts]
        dtype = visual.conv1.weight.dtype
        rgb = visual.conv1(torch.cat(pixels).to(device, dtype))  # [I, C, h, w]: once per image
        index_t, alpha = torch.tensor(index, device=device), torch.cat(alphas)
        scale, weights = self.model.logit_scale.exp().float(), self.weights.T.to(device)
        out = []
        for s in range(0, len(index), self.batch_size):
            feats = encode_regions(visual, rgb, index_t[s : s + self.batch_size],
                                   alpha[s : s + self.batch_size].to(device)).float()
            out.append((scale * torch.nn.functional.normalize(feats, dim=-1) @ weights).softmax(-1))
        return list(torch.cat(out).cpu().split(counts))

    def _inputs(self, images: Sequence[Any], regions: Sequence[Sequence[Any]]) -> Tuple[list, list, list]:
        """``(image index [R], alphas, pixels)``: in alpha mode one pixel tensor per image and the regions as
        alpha; in crop mode one pixel tensor per region (its crop) with whole-image alpha."""
        index: list = []
        alphas: list = []
        pixels: list = []
        for image, rs in zip(images, regions):
            if len(rs) == 0:
                continue
            if self.region_mode == "alpha":
                px, size = self.processor.pixels(image)
                pixels.append(px)
                alphas.append(self.processor.alphas(list(rs), size))
                index += [len(pixels) - 1] * len(rs)
                continue
            full = image_to_tensor(image, self.processor.max_pixels)
            for r in rs:
                px, size = self.processor.pixels(crop_region(full, r))
                pixels.append(px)
                alphas.append(self.processor.alphas([None], size))
                index.append(len(pixels) - 1)
        return index, alphas, pixels


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


def fuse_detections(
    clip: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, novel: Optional[torch.Tensor] = None,
    alpha_base: float = 0.35, beta_novel: float = 0.65,
) -> torch.Tensor:
    """Fused score ``[N]`` of N detections from their Alpha-CLIP probabilities ``clip [N, K]``."""
    if len(labels) == 0:
        return scores
    rows = torch.arange(len(labels), device=scores.device)
    clip = clip.to(scores.device)
    det = torch.zeros_like(clip)
    det[rows, labels] = scores.float()
    return fuse_scores(det, clip, novel, alpha_base, beta_novel)[rows, labels].to(scores.dtype)


@dataclass
class Rescored:
    """Re-scored detections of one image: ``keep [M]`` indexes the detector's N detections (sorted by
    fused score, thresholded and cut), ``scores [M]`` the fused scores, ``clip_scores [M, K]``."""

    keep: torch.Tensor
    scores: torch.Tensor
    clip_scores: torch.Tensor


class DetectionRescorer:
    """Alpha-CLIP re-scoring of a detector's predictions. Detection adapters hold one as ``rescorer``.

    Per image: the detector's ``topk`` best detections are scored by Alpha-CLIP (regions of all images
    batched), fused with the detector's score, sorted, kept above ``score_thr`` and cut to ``max_per_img``.
    The adapters hand the detector's own test threshold and cut over to this (they come after fusion).

    Args:
        scorer: scores regions against the detector's vocabulary (in its label order).
        novel_classes: names the detector never trained on (weighted by ``beta_novel``).
        alpha_base, beta_novel: weight of Alpha-CLIP in the geometric mean for base / novel classes.
        topk: detections per image re-scored (by detector score); 0 = all.
        score_thr: fused scores at or below it are dropped.
        max_per_img: detections kept per image after fusion; 0 = all.
    """

    def __init__(self, scorer: RegionScorer, novel_classes: Sequence[str] = (), alpha_base: float = 0.35,
                 beta_novel: float = 0.65, topk: int = 100, score_thr: float = 0.0, max_per_img: int = 100):
        if topk < 0 or max_per_img < 0:
            raise ValueError(f"topk and max_per_img must be >= 0 (0 = all); got {topk} and {max_per_img}")
        self.scorer, self.alpha_base, self.beta_novel = scorer, alpha_base, beta_novel
        self.topk, self.score_thr, self.max_per_img = topk, score_thr, max_per_img
        self.novel_classes = set(novel_classes)

    def set_vocabulary(self, labels: Sequence[str], novel_classes: Sequence[str] = ()) -> None:
        self.scorer.set_vocabulary(labels)
        self.novel_classes = set(novel_classes)

    def _novel(self) -> torch.Tensor:
        return torch.tensor([name in self.novel_classes for name in self.scorer.labels], dtype=torch.bool)

    @torch.no_grad()
    def rescore(
        self, images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
        scores: Sequence[torch.Tensor], masks: Optional[Sequence[Optional[Sequence[Any]]]] = None,
    ) -> List[Rescored]:
        """Re-score the detections of a batch of images.

        Args:
            images: per image ``[3, H, W]`` RGB in [0, 1].
            boxes: per image ``[N, 4]`` ``xyxy`` in that image's pixels.
            labels, scores: per image ``[N]`` the detector's class and score.
            masks: per image None or N masks of the image's size, scored instead of the boxes.
        """
        candidates, regions = [], []
        for i, (image, b, s) in enumerate(zip(images, boxes, scores)):
            k = len(s) if self.topk == 0 else min(self.topk, len(s))
            top = s.topk(k).indices  # the detector's best first
            m = masks[i] if masks is not None else None
            h, w = image.shape[-2:]
            regions.append([m[j] for j in top.tolist()] if m is not None else clip_boxes(b[top], h, w))
            candidates.append(top)
        probs = self.scorer.score_batch(images, regions)
        novel, out = self._novel(), []
        for top, p, l, s in zip(candidates, probs, labels, scores):
            fused = fuse_detections(p, l[top], s[top], novel, self.alpha_base, self.beta_novel)
            order = fused.argsort(descending=True, stable=True)
            order = order[fused[order] > self.score_thr]
            if self.max_per_img:
                order = order[: self.max_per_img]
            out.append(Rescored(top[order], fused[order], p[order.cpu()]))
        return out

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                 masks: Optional[Sequence[Any]] = None) -> Rescored:
        """:meth:`rescore` of one image."""
        return self.rescore([image], [boxes], [labels], [scores], None if masks is None else [masks])[0]


def select_rescored(instances: Sequence[Any], rescored: Sequence[Rescored]) -> List[Any]:
    """Per image, the kept detections of a framework's container (mmdet ``InstanceData``, detectron2
    ``Instances``: anything indexable by a LongTensor), with fused ``scores`` and ``clip_scores [M, K]``."""
    out = []
    for inst, r in zip(instances, rescored):
        device = r.scores.device
        new = inst[r.keep.to(device)]
        new.scores, new.clip_scores = r.scores, r.clip_scores.to(device)
        out.append(new)
    return out
