"""Open-vocabulary detection with MMDetection: the core's zero-shot classifier and Alpha-CLIP re-scoring."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from mmdet.models.detectors import TwoStageDetector
from mmdet.registry import MODELS
from mmdet.visualization.palette import get_palette
from mmengine.visualization import Visualizer
from torch import nn

from ...core.factory import resolve_model
from ...detection.open_vocab import DetectionRescorer, RegionScorer, ZeroShotClassifier, swap_vocabulary
from .data import denormalize_rgb

# Built by BBoxHead from `cls_predictor_cfg`, which passes in_features and out_features (classes + 1).
MODELS.register_module(name="ZeroShotClassifier", module=ZeroShotClassifier)


@MODELS.register_module()
class AlphaCLIPRegionScorer(nn.Module):
    """Re-score detections with Alpha-CLIP: the full image, each box (or mask) as alpha.

    Args:
        labels: the detector's class names, in its label order.
        clip: ``"default"`` (embedded model), a ``save_pretrained`` directory, a checkpoint, or
            ``create_model`` keyword arguments.
        novel_classes: names the detector never trained on (weighted by ``beta_novel``).
        alpha_base, beta_novel: weight of Alpha-CLIP in the geometric mean for base / novel classes.
        use_masks: score predicted masks instead of boxes when the detector has them.
    """

    def __init__(self, labels: Sequence[str], clip: Any = "default", templates: Any = "ovseg",
                 novel_classes: Sequence[str] = (), alpha_base: float = 0.35, beta_novel: float = 0.65,
                 use_masks: bool = False):
        super().__init__()
        self.clip = resolve_model(clip).eval()
        self.rescorer = DetectionRescorer(RegionScorer(self.clip, labels, templates), novel_classes, alpha_base,
                                          beta_novel)
        self.use_masks = use_masks

    def score(self, image: torch.Tensor, regions: Sequence[Any]) -> torch.Tensor:
        """``[N, K]`` Alpha-CLIP probabilities of regions of ``image [3, H, W]`` (values in [0, 1])."""
        return self.rescorer.scorer(image, regions)

    @torch.no_grad()
    def rescore(self, image: torch.Tensor, pred, scale_factor: Sequence[float] = (1.0, 1.0)) -> None:
        """Fuse Alpha-CLIP into ``pred.scores`` in place and add ``pred.clip_scores [N, K]``.

        ``pred`` is in original-image pixels; ``image [3, h, w]`` is the network input, ``scale_factor``
        ``(w, h)`` times the original.
        """
        h, w = image.shape[-2:]
        masks: Optional[List[Any]] = None
        if self.use_masks and "masks" in pred and len(pred):
            masks = [m.cpu().numpy() > 0.5 for m in
                     F.interpolate(pred.masks[:, None].float(), size=(h, w), mode="nearest")[:, 0]]
        boxes = pred.bboxes * pred.bboxes.new_tensor(list(scale_factor) * 2)
        pred.scores, pred.clip_scores = self.rescorer(image, boxes, pred.labels, pred.scores, masks)


@MODELS.register_module()
class OpenVocabTwoStageDetector(TwoStageDetector):
    """A two-stage detector (Faster / Mask R-CNN) whose predictions are re-scored by Alpha-CLIP.

    Args:
        region_scorer: an ``AlphaCLIPRegionScorer`` config; None = the plain detector.
        **kwargs: as ``TwoStageDetector``.
    """

    def __init__(self, region_scorer: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        self.region_scorer = MODELS.build(region_scorer) if region_scorer is not None else None

    def predict(self, batch_inputs: torch.Tensor, batch_data_samples, rescale: bool = True):
        results = super().predict(batch_inputs, batch_data_samples, rescale=rescale)
        if self.region_scorer is None:
            return results
        images = denormalize_rgb(self.data_preprocessor, batch_inputs)
        for image, sample in zip(images, results):
            h, w = sample.img_shape
            scale = sample.scale_factor if rescale else (1.0, 1.0)
            self.region_scorer.rescore(image[:, :h, :w], sample.pred_instances, scale)
        return results


def set_vocabulary(
    detector: nn.Module, text_embeddings: Union[str, Path], novel_classes: Sequence[str] = (),
    visualizer: Optional[Any] = None,
) -> List[str]:
    """Swap a built detector's vocabulary in place: everything that names or counts its classes.

    The zero-shot classifier, the head's ``num_classes`` and the re-scorer take the new classes;
    ``detector.dataset_meta`` (what ``DetInferencer`` and ``inference_detector`` label with) and the
    visualiser's ``dataset_meta`` get them as ``classes``, with a palette long enough for them.

    Args:
        text_embeddings: a file written by ``alphaclip vocab`` / ``save_text_embeddings``.
        novel_classes: names among them the detector never trained on.
        visualizer: the visualiser to update (e.g. ``DetInferencer.visualizer``); default: mmengine's
            current one, if any.

    Returns:
        The new class names, in label order.
    """
    labels = swap_vocabulary(detector, text_embeddings, novel_classes,
                             heads=lambda m: isinstance(getattr(m, "fc_cls", None), ZeroShotClassifier))
    meta = dict(getattr(detector, "dataset_meta", None) or {})
    meta["classes"] = tuple(labels)
    palette = meta.get("palette")
    if isinstance(palette, (list, tuple)) and len(palette) >= len(labels):
        meta["palette"] = list(palette[: len(labels)])
    else:  # mmdet's fixed-seed random palette: the same colours on every call
        meta["palette"] = get_palette("random", len(labels))
    detector.dataset_meta = meta
    if visualizer is None:
        try:
            visualizer = Visualizer.get_current_instance()
        except RuntimeError:  # no visualiser was created
            pass
    if visualizer is not None:
        visualizer.dataset_meta = meta
    return labels
