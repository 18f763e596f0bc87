"""``AlphaGeneralizedRCNN``: GeneralizedRCNN for RGB + alpha, any checkpoint layout, Alpha-CLIP re-scoring."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from ...core.io import read_state_dict
from ...core.vision import VisionTransformer
from ...core.weights import read_weights, resolve
from ...detection.open_vocab import DetectionRescorer, RegionScorer, scorer_model
from ...detection.rescore import select_rescored
from .open_vocab import clip_spec

_DETECTOR_PREFIXES = ("backbone.", "proposal_generator.", "roi_heads.", "pixel_mean", "pixel_std")


@META_ARCH_REGISTRY.register()
class AlphaGeneralizedRCNN(GeneralizedRCNN):
    """GeneralizedRCNN for an Alpha-CLIP backbone.

    * ``PIXEL_MEAN``/``PIXEL_STD`` hold four values (RGB + alpha); a 3-channel input gets an all-foreground
      alpha (the whole image), and padding is filled with background alpha.
    * ``load_state_dict`` accepts any layout the core loader reads (official Alpha-CLIP ``.pth``, OpenAI,
      open_clip, Hugging Face, timm): it is converted into the backbone's vision tower, so
      ``DetectionCheckpointer(model).load(path)`` / ``MODEL.WEIGHTS`` just work.
    * With a ``rescorer``, inference re-scores the box predictor's best ``RESCORE_TOPK`` detections per
      image with Alpha-CLIP (its box as alpha, all images' regions batched), then fuses, sorts, and applies
      the predictor's test score threshold and detections-per-image cut to the fused scores. The
      re-scorer's CLIP is frozen and not a submodule (no parameters, no checkpoint entries); ``.to()``
      moves it.
    """

    @configurable
    def __init__(self, *, rescorer: Optional[DetectionRescorer] = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.rescorer = rescorer
        predictor = getattr(self.roi_heads, "box_predictor", None)
        if rescorer is not None and predictor is not None:  # threshold and cut come after fusion
            rescorer.score_thr, rescorer.max_per_img = predictor.test_score_thresh, predictor.test_topk_per_image
            predictor.test_score_thresh = 0.0
            if rescorer.topk:
                predictor.test_topk_per_image = rescorer.topk
        self._register_load_state_dict_pre_hook(self._convert_foreign_checkpoint)

    def _apply(self, fn, *args, **kwargs):
        if self.rescorer is not None:
            self.rescorer.scorer.model._apply(fn)
        return super()._apply(fn, *args, **kwargs)

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        ret = super().from_config(cfg)
        a = cfg.MODEL.get("ALPHACLIP")
        if a is not None and a.RESCORE:
            scorer = RegionScorer(scorer_model(clip_spec(cfg)), a.CLASS_NAMES, a.TEMPLATES,
                                  region_mode=a.RESCORE_MODE)
            ret["rescorer"] = DetectionRescorer(scorer, a.NOVEL_CLASSES, a.ALPHA_BASE, a.BETA_NOVEL, topk=a.RESCORE_TOPK)
        return ret

    # --- input ----------------------------------------------------------------------------------------
    def preprocess_image(self, batched_inputs: List[Dict[str, Any]]):
        if self.pixel_mean.shape[0] == 4:
            batched_inputs = [{**x, "image": _with_alpha(x["image"])} for x in batched_inputs]
        images = super().preprocess_image(batched_inputs)
        if self.pixel_mean.shape[0] == 4:
            background = float((0.0 - self.pixel_mean[3]) / self.pixel_std[3])
            for i, (h, w) in enumerate(images.image_sizes):
                images.tensor[i, 3, h:, :] = background
                images.tensor[i, 3, :, w:] = background
        return images

    # --- checkpoints ------------------------------------------------------------------------------------
    def _tower_prefix(self) -> str:
        for name, module in self.named_modules():
            if isinstance(module, VisionTransformer):
                return name + "."
        raise ValueError("the model has no Alpha-CLIP vision tower to load the checkpoint into")

    def convert_checkpoint(self, sd: Dict[str, Any], source: Optional[str] = None) -> Dict[str, Any]:
        """A checkpoint of any layout the core reads -> this model's keys (its vision tower's weights).

        A detectron2 checkpoint of this model passes unchanged; anything else goes through the core
        resolver (converted, architecture checked, positions resampled).
        """
        if not sd or any(k.startswith(_DETECTOR_PREFIXES) for k in sd):
            return sd
        tower = self._tower_prefix()
        weights, _ = resolve(read_weights(sd, source), self.get_submodule(tower[:-1]).cfg)  # the one way in
        return {tower + k: v for k, v in weights.items()}

    def _convert_foreign_checkpoint(self, state_dict, prefix, *args) -> None:
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        converted = self.convert_checkpoint(own)
        if converted is not own:
            for k in own:
                del state_dict[prefix + k]
            state_dict.update({prefix + k: v for k, v in converted.items()})

    # --- output -------------------------------------------------------------------------------------------
    def inference(self, batched_inputs, detected_instances=None, do_postprocess: bool = True):
        results = super().inference(batched_inputs, detected_instances, do_postprocess)
        if self.rescorer is None or not do_postprocess:
            return results
        for r, inst in zip(results, self._rescore(batched_inputs, [r["instances"] for r in results])):
            r["instances"] = inst
        return results

    @torch.no_grad()
    def _rescore(self, batched_inputs: List[Dict[str, Any]], instances: List[Any]) -> List[Any]:
        """Re-scored, sorted, thresholded and cut copies of ``instances`` (in output pixels), with
        ``clip_scores [M, K]``; the images are the network inputs (``x["image"]``)."""
        images, boxes = [], []
        for x, inst in zip(batched_inputs, instances):
            image = x["image"][:3].float() / 255.0
            images.append(image.flip(0) if self.input_format == "BGR" else image)
            h, w = image.shape[-2:]
            out_h, out_w = inst.image_size
            b = inst.pred_boxes.tensor
            boxes.append(b * b.new_tensor([w / out_w, h / out_h] * 2))
        out = self.rescorer.rescore(images, boxes, [i.pred_classes for i in instances], [i.scores for i in instances])
        return select_rescored(instances, out)


def _with_alpha(image: torch.Tensor) -> torch.Tensor:
    """A 3-channel image gets an all-foreground alpha (255): the whole image."""
    if image.shape[0] == 3:
        return torch.cat([image, torch.full_like(image[:1], 255)])
    if image.shape[0] != 4:
        raise ValueError(f"images must have 3 or 4 channels (RGB + alpha); got {image.shape[0]}")
    return image


class AlphaCLIPCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that reads every file through the core reader: safetensors, TorchScript
    archives (OpenAI CLIP), Hugging Face and ``save_pretrained`` directories, and pickles only with
    ``weights_only=True`` (so detectron2's ``.pkl`` files, which need full unpickling, are refused rather
    than run). Foreign layouts are converted by the model's :meth:`AlphaGeneralizedRCNN.convert_checkpoint`,
    so errors name the file."""

    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        if path and os.path.isdir(path):  # fvcore's load takes files only
            incompatible = self._load_model(self._load_file(path))
            if incompatible is not None:
                self._log_incompatible_keys(incompatible)
            return {}
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        sd = read_state_dict(filename)
        model = getattr(self.model, "module", self.model)  # DDP-wrapped or not
        if isinstance(model, AlphaGeneralizedRCNN):
            sd = model.convert_checkpoint(sd, filename)
        return {"model": sd, "__author__": "alphaclip-plugins"}
