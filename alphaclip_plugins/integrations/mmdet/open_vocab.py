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

from ...detection.open_vocab import (
    DetectionRescorer, RegionMode, RegionScorer, ZeroShotClassifier, backbone_clip_spec, scorer_model, swap_vocabulary,
)
from ...detection.rescore import select_rescored
from .data import denormalize_rgb

# Built by BBoxHead from `cls_predictor_cfg`, which passes in_features and out_features (classes + 1).
MODELS.register_module(name="ZeroShotClassifier", module=ZeroShotClassifier)


_BACKBONE_ARGS = ("type", "arch", "out_indices", "norm_out", "frozen", "frozen_stages", "with_cp", "window_size",
                  "global_blocks", "out_stride", "init_cfg")


def _backbone_of(backbone: Optional[dict]) -> Optional[dict]:
    """An ``AlphaCLIPViT`` config -> ``backbone_clip_spec`` arguments (architecture, weights, overrides)."""
    if not backbone or backbone.get("type") not in ("AlphaCLIPViT", "mmdet.AlphaCLIPViT"):
        return None
    init = backbone.get("init_cfg") or {}
    return dict(arch=backbone.get("arch", "ViT-B/16"), checkpoint=init.get("checkpoint"),
                **{k: v for k, v in backbone.items() if k not in _BACKBONE_ARGS})


@MODELS.register_module()
class AlphaCLIPRegionScorer(nn.Module):
    """Re-score detections with Alpha-CLIP: the full image, each box (or mask) as alpha.

    The CLIP is frozen and held outside the module tree: it has no parameters for DDP to reduce and no
    place in the detector's checkpoints; it is rebuilt from this config (``clip``) whenever the detector
    is. ``.to()`` / ``.cuda()`` still move it.

    Args:
        labels: the detector's class names, in its label order.
        clip: ``"backbone"`` (the backbone's architecture and initial weights, filled in by
            ``OpenVocabTwoStageDetector``; a vision-tower-only checkpoint needs ``text_checkpoint``),
            ``"default"`` (the embedded demo model), a ``save_pretrained`` directory, a checkpoint, or
            ``create_model`` keyword arguments.
        text_checkpoint: with ``clip="backbone"``: the CLIP file of the text tower (e.g. ``ViT-B-16.pt``).
        novel_classes: names the detector never trained on (weighted by ``beta_novel``).
        alpha_base, beta_novel: weight of Alpha-CLIP in the geometric mean for base / novel classes.
        topk: detections per image re-scored (the detector's best); the detector's own ``score_thr`` and
            ``max_per_img`` then apply to the fused scores.
        batch_size: regions per forward, across the images of a batch.
        use_masks: score predicted masks instead of boxes when the detector has them.
        mode: ``"alpha"``: the whole image with each region as alpha (Alpha-CLIP); ``"crop"``: each box
            cropped and seen whole (the usual CLIP re-scoring, for comparison).
        backbone: ``backbone_clip_spec`` arguments, set by the detector from its backbone config.
    """

    def __init__(self, labels: Sequence[str], clip: Any = "backbone", templates: Any = "ovseg",
                 novel_classes: Sequence[str] = (), alpha_base: float = 0.35, beta_novel: float = 0.65,
                 topk: int = 100, batch_size: int = 64, use_masks: bool = False,
                 text_checkpoint: Optional[str] = None, backbone: Optional[dict] = None, mode: RegionMode = "alpha"):
        super().__init__()
        if clip == "backbone":
            if backbone is None:
                raise ValueError("clip='backbone' builds the scorer from the detector's AlphaCLIPViT backbone; "
                                 "build it inside OpenVocabTwoStageDetector, or set clip to a model")
            clip = backbone_clip_spec(text_checkpoint=text_checkpoint, **backbone)
        model = scorer_model(clip)
        self.__dict__["clip"] = model  # not a submodule: no parameters, no state_dict entries
        self.rescorer = DetectionRescorer(RegionScorer(model, labels, templates, batch_size=batch_size,
                                                       region_mode=mode),
                                          novel_classes, alpha_base, beta_novel, topk=topk)
        self.use_masks = use_masks
        self._register_load_state_dict_pre_hook(self._drop_saved_clip)

    @staticmethod
    def _drop_saved_clip(state_dict, prefix, *args) -> None:
        """Checkpoints of earlier versions held the scorer's CLIP; it is rebuilt from the config instead."""
        for k in [k for k in state_dict if k.startswith(prefix + "clip.")]:
            del state_dict[k]

    def _apply(self, fn, *args, **kwargs):
        self.clip._apply(fn)
        return super()._apply(fn, *args, **kwargs)

    def score(self, image: torch.Tensor, regions: Sequence[Any]) -> torch.Tensor:
        """``[N, K]`` Alpha-CLIP probabilities of regions of ``image [3, H, W]`` (values in [0, 1])."""
        return self.rescorer.scorer(image, regions)

    @torch.no_grad()
    def rescore_batch(self, images: Sequence[torch.Tensor], preds: Sequence[Any],
                      scale_factors: Sequence[Sequence[float]]) -> List[Any]:
        """Re-scored copies of ``preds`` (``InstanceData`` in original-image pixels): the top ``topk`` scored,
        fused, sorted, thresholded and cut; ``clip_scores [M, K]`` added. ``images[i] [3, h, w]`` is the
        network input, ``scale_factors[i]`` ``(w, h)`` times the original."""
        boxes, masks = [], []
        for image, pred, scale in zip(images, preds, scale_factors):
            boxes.append(pred.bboxes * pred.bboxes.new_tensor(list(scale) * 2))
            h, w = image.shape[-2:]
            if self.use_masks and "masks" in pred and len(pred):
                masks.append([m.cpu().numpy() > 0.5 for m in
                              F.interpolate(pred.masks[:, None].float(), size=(h, w), mode="nearest")[:, 0]])
            else:
                masks.append(None)
        out = self.rescorer.rescore(images, boxes, [p.labels for p in preds], [p.scores for p in preds],
                                    masks if any(m is not None for m in masks) else None)
        return select_rescored(preds, out)

    def rescore(self, image: torch.Tensor, pred, scale_factor: Sequence[float] = (1.0, 1.0)):
        """:meth:`rescore_batch` of one image."""
        return self.rescore_batch([image], [pred], [scale_factor])[0]


@MODELS.register_module()
class OpenVocabTwoStageDetector(TwoStageDetector):
    """A two-stage detector (Faster / Mask R-CNN) whose predictions are re-scored by Alpha-CLIP.

    With a re-scorer, the RoI head's ``score_thr`` and ``max_per_img`` are applied after fusion (by the
    re-scorer); the head itself keeps its ``topk`` best detections per image for re-scoring.

    Args:
        region_scorer: an ``AlphaCLIPRegionScorer`` config; its ``clip`` defaults to ``"backbone"``.
        **kwargs: as ``TwoStageDetector``.
    """

    def __init__(self, region_scorer: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        self.region_scorer = None
        if region_scorer is not None:
            region_scorer = dict(region_scorer)
            if region_scorer.get("clip", "backbone") == "backbone":
                region_scorer.setdefault("backbone", _backbone_of(kwargs.get("backbone")))
            self.region_scorer = MODELS.build(region_scorer)
            self._hand_over_test_cut(self.region_scorer.rescorer)

    def _hand_over_test_cut(self, rescorer: DetectionRescorer) -> None:
        cfg = getattr(self.roi_head, "test_cfg", None)
        if cfg is None:
            return
        rescorer.score_thr, rescorer.max_per_img = cfg.get("score_thr", 0.0), cfg.get("max_per_img", 0)
        cfg.score_thr = 0.0
        if rescorer.topk:
            cfg.max_per_img = rescorer.topk

    def predict(self, batch_inputs: torch.Tensor, batch_data_samples, rescale: bool = True):
        results = super().predict(batch_inputs, batch_data_samples, rescale=rescale)
        if self.region_scorer is None:
            return results
        images = denormalize_rgb(self.data_preprocessor, batch_inputs)
        crops = [image[:, : s.img_shape[0], : s.img_shape[1]] for image, s in zip(images, results)]
        scales = [s.scale_factor if rescale else (1.0, 1.0) for s in results]
        preds = self.region_scorer.rescore_batch(crops, [s.pred_instances for s in results], scales)
        for sample, pred in zip(results, preds):
            sample.pred_instances = pred
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
