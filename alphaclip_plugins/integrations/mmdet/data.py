"""4-channel data for MMDetection: an alpha channel in the pipeline, normalised in the preprocessor."""
from __future__ import annotations

import logging
from typing import List, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmcv.transforms import BaseTransform
from mmdet.datasets import CocoDataset
from mmdet.datasets.transforms import Pad
from mmdet.models.data_preprocessors import BatchFixedSizePad, DetDataPreprocessor
from mmdet.registry import DATASETS, MODELS, TRANSFORMS
from mmengine.logging import print_log

from ...detection.inputs import PROMPT_KEY, RGBA_MEAN_255, RGBA_STD_255, missing_prompt_error, sample_alpha

_SHARED_SOURCE = {"whole": "whole", "gt_bboxes": "boxes", "gt_masks": "masks", "prompt": "prompt"}


@TRANSFORMS.register_module()
class AddAlphaChannel(BaseTransform):
    """Append an alpha channel (uint8, 255 = region) to ``results["img"]``.

    Put it after photometric transforms and before geometric ones (Resize, Flip, Pad), which then move
    image and alpha together. Pad with :class:`AlphaPad` (mmdet's ``Pad`` asserts on a 3-value pad and
    fills alpha with a scalar pad's value), or leave padding to :class:`AlphaDetDataPreprocessor`.

    Args:
        source: ``"whole"`` (all foreground), ``"gt_bboxes"`` / ``"gt_masks"`` (the union of the
            annotations: referring-style prompts), or ``"prompt"`` (``results["alpha_prompt"]``: a box
            ``xyxy``, a mask, a polygon or an RLE, in image pixels, which :class:`AlphaCocoDataset` copies
            from the COCO JSON's ``images[i]["alpha_prompt"]``).
        fallback: what ``"prompt"`` does for a sample without a prompt: ``"error"`` (raise) or
            ``"whole"`` (the whole image).
    """

    def __init__(self, source: str = "whole", fallback: Literal["error", "whole"] = "error"):
        if source not in ("whole", "gt_bboxes", "gt_masks", "prompt"):
            raise ValueError(f"source must be 'whole', 'gt_bboxes', 'gt_masks' or 'prompt'; got {source!r}")
        if fallback not in ("error", "whole"):
            raise ValueError(f"fallback must be 'error' or 'whole'; got {fallback!r}")
        self.source, self.fallback = source, fallback

    def _mask(self, results: dict, h: int, w: int) -> np.ndarray:
        boxes = results.get("gt_bboxes") if self.source == "gt_bboxes" else None
        masks = results.get("gt_masks") if self.source == "gt_masks" else None
        return sample_alpha(
            _SHARED_SOURCE[self.source], h, w,
            boxes=np.asarray(getattr(boxes, "tensor", boxes)).reshape(-1, 4) if boxes is not None else None,
            masks=list(masks.to_ndarray()) if masks is not None and len(masks) else None,
            prompt=results.get("alpha_prompt"),
        )

    def transform(self, results: dict) -> dict:
        img = results["img"]
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"AddAlphaChannel expects an [H, W, 3] image; got shape {img.shape}")
        if self.source == "prompt" and results.get(PROMPT_KEY) is None and self.fallback == "error":
            raise missing_prompt_error(results.get("img_path", "an image"), "type='AlphaCocoDataset'",
                                       "AddAlphaChannel(source='prompt', fallback='whole')")
        h, w = img.shape[:2]
        alpha = np.rint(self._mask(results, h, w) * 255).astype(img.dtype)
        results["img"] = np.concatenate([img, alpha[..., None]], axis=2)
        return results

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, fallback={self.fallback!r})"


@DATASETS.register_module()
class AlphaCocoDataset(CocoDataset):
    """``CocoDataset`` that delivers each image's alpha prompt and can hold classes out of training.

    ``images[i]["alpha_prompt"]`` of the COCO JSON (a box ``[x0, y0, x1, y1]`` in pixels, ``{"box": ...}``,
    ``{"polygon": [...]}``, a COCO RLE or ``null``) becomes ``results["alpha_prompt"]``, which
    ``AddAlphaChannel(source='prompt')`` draws before the geometric transforms move it with the image.

    Args:
        novel_classes: names among ``metainfo["classes"]`` whose annotations are dropped (open-vocabulary
            training on the base classes); the other labels keep their index among all classes. With
            ``filter_cfg.filter_empty_gt`` an image left without annotations is dropped. Empty for test sets.
        **kwargs: as ``CocoDataset``.
    """

    def __init__(self, *args, novel_classes: Sequence[str] = (), **kwargs):
        self.novel_classes = tuple(novel_classes)
        self._held_out: set = set()
        super().__init__(*args, **kwargs)

    def load_data_list(self) -> List[dict]:
        classes = list(self.metainfo["classes"])
        unknown = [c for c in self.novel_classes if c not in classes]
        if unknown:  # no annotation can carry them: nothing to drop, but likely a misspelt name
            print_log(f"novel_classes {unknown} are not among the dataset's classes {classes}", "current",
                      logging.WARNING)
        self._held_out = {classes.index(c) for c in self.novel_classes if c in classes}
        return super().load_data_list()

    def parse_data_info(self, raw_data_info: dict) -> dict:
        info = super().parse_data_info(raw_data_info)
        prompt = raw_data_info["raw_img_info"].get(PROMPT_KEY)
        if prompt is not None:
            info[PROMPT_KEY] = prompt
        if self._held_out:
            info["instances"] = [i for i in info["instances"] if i["bbox_label"] not in self._held_out]
        return info

    def filter_data(self) -> List[dict]:
        data = super().filter_data()
        if self.test_mode or not self._held_out or not (self.filter_cfg or {}).get("filter_empty_gt", False):
            return data
        return [d for d in data if d["instances"]]  # images whose annotations were all novel


@TRANSFORMS.register_module()
class AlphaPad(Pad):
    """mmdet's ``Pad`` for RGB + alpha images: RGB is padded with ``pad_val["img"]`` (a scalar or three
    values, e.g. YOLOX's ``(114, 114, 114)``), alpha always with 0, i.e. background. 3-channel images are
    padded exactly as ``Pad`` does. Arguments as ``Pad``.
    """

    def _pad_img(self, results: dict) -> None:
        img = results["img"]
        if img.ndim != 3 or img.shape[2] != 4:
            return super()._pad_img(results)
        pad_val = self.pad_val.get("img", 0)
        if isinstance(pad_val, (tuple, list)) and len(pad_val) != 3:
            raise ValueError(f"AlphaPad pads RGB with pad_val['img'] and alpha with background; give a scalar "
                             f"or 3 values (R, G, B), got {tuple(pad_val)}")
        h, w = img.shape[:2]
        results["img"] = img[..., :3]
        super()._pad_img(results)  # RGB, and pad_shape / img_shape of the padded size
        alpha = np.zeros(results["img"].shape[:2], img.dtype)  # constant padding goes right and below
        alpha[:h, :w] = img[..., 3]
        results["img"] = np.concatenate([results["img"], alpha[..., None]], axis=2)
        results["pad_shape"] = results["img"].shape


@MODELS.register_module()
class AlphaDetDataPreprocessor(DetDataPreprocessor):
    """``DetDataPreprocessor`` for RGB + alpha.

    RGB takes the usual path (BGR->RGB, CLIP mean/std, padding); the alpha channel is normalised with its
    own mean/std (0.5/0.26 on the 0-255 scale), padded as background, and appended. ``batch_augments`` see
    all four channels; what a ``BatchFixedSizePad`` adds is background in alpha (its ``img_pad_value`` in
    RGB). Batches of 3-channel images pass through unchanged: the backbone reads them as whole images.

    Args:
        mean, std: four values (R, G, B, alpha) on the 0-255 scale; default CLIP's and alpha's.
        **kwargs: as ``DetDataPreprocessor`` (``bgr_to_rgb``, ``pad_size_divisor``, ``batch_augments``...).
    """

    def __init__(self, mean: Sequence[float] = RGBA_MEAN_255, std: Sequence[float] = RGBA_STD_255, **kwargs):
        if len(mean) != 4 or len(std) != 4:
            raise ValueError(f"mean and std need 4 values (R, G, B, alpha); got {len(mean)} and {len(std)}")
        super().__init__(mean=list(mean[:3]), std=list(std[:3]), **kwargs)
        self.alpha_mean, self.alpha_std = float(mean[3]), float(std[3])

    def _split(self, inputs) -> tuple:
        channels = {int(x.shape[-3]) for x in inputs}
        if len(channels) != 1 or channels - {3, 4}:
            raise ValueError(f"a batch must be all 3-channel or all 4-channel images; got channels {sorted(channels)}")
        if channels == {3}:
            return inputs, None
        if isinstance(inputs, torch.Tensor):
            return inputs[:, :3], list(inputs[:, 3:])
        return [x[:3] for x in inputs], [x[3:] for x in inputs]

    @property
    def alpha_background(self) -> float:
        """Background alpha after normalisation: -1.9231 with the default statistics."""
        return (0.0 - self.alpha_mean) / self.alpha_std

    def _alpha(self, alphas: List[torch.Tensor], size, device) -> torch.Tensor:
        background = self.alpha_background
        out = []
        for a in alphas:
            a = (a.to(device).float() - self.alpha_mean) / self.alpha_std
            out.append(F.pad(a, (0, size[1] - a.shape[-1], 0, size[0] - a.shape[-2]), value=background))
        return torch.stack(out)

    def forward(self, data: dict, training: bool = False) -> dict:
        rgb, alphas = self._split(data["inputs"])
        augments, self.batch_augments = self.batch_augments, None  # applied below, to all four channels
        try:
            out = super().forward({**data, "inputs": rgb}, training)
        finally:
            self.batch_augments = augments
        inputs, samples = out["inputs"], out["data_samples"]
        if alphas is not None:
            inputs = torch.cat([inputs, self._alpha(alphas, inputs.shape[-2:], inputs.device)], dim=1)
        if training and augments is not None:
            for aug in augments:
                h, w = inputs.shape[-2:]
                inputs, samples = aug(inputs, samples)
                if alphas is not None and isinstance(aug, BatchFixedSizePad):  # it pads right and below
                    inputs[:, 3, h:, :] = self.alpha_background
                    inputs[:, 3, :, w:] = self.alpha_background
        return {"inputs": inputs, "data_samples": samples}


def denormalize_rgb(preprocessor: Optional[DetDataPreprocessor], inputs: torch.Tensor) -> torch.Tensor:
    """Undo the preprocessor's RGB normalisation: ``[B, C, H, W]`` -> RGB in [0, 1] ``[B, 3, H, W]``."""
    rgb = inputs[:, :3]
    if preprocessor is not None and getattr(preprocessor, "_enable_normalize", False):
        rgb = rgb * preprocessor.std.to(rgb.device) + preprocessor.mean.to(rgb.device)
    return (rgb / 255.0).clamp(0, 1)
