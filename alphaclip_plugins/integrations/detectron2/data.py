"""``AlphaDatasetMapper``: Detectron2's dataset mapper with an alpha channel moved by the same transforms."""
from __future__ import annotations

import copy
from typing import Any, Dict

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from detectron2.structures import BoxMode

from ...detection.inputs import sample_alpha

SOURCES = ("whole", "gt_boxes", "gt_masks", "prompt")
_SHARED_SOURCE = {"whole": "whole", "gt_boxes": "boxes", "gt_masks": "masks", "prompt": "prompt"}


def alpha_mask(dataset_dict: Dict[str, Any], source: str, height: int, width: int) -> np.ndarray:
    """The region of a dataset dict as a float mask ``[H, W]`` in [0, 1], before any transform.

    ``gt_boxes`` / ``gt_masks`` take the union of the annotations (referring-style prompts);
    ``prompt`` reads ``dataset_dict["alpha_prompt"]`` (box ``xyxy``, mask, polygon or RLE).
    """
    if source not in SOURCES:
        raise ValueError(f"alpha_source must be one of {SOURCES}; got {source!r}")
    annotations = dataset_dict.get("annotations") or []
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations] if source == "gt_boxes" else None
    masks = [{"polygon": a["segmentation"]} if isinstance(a["segmentation"], list) else a["segmentation"]
             for a in annotations] if source == "gt_masks" else None
    return sample_alpha(_SHARED_SOURCE[source], height, width, boxes=boxes, masks=masks,
                        prompt=dataset_dict.get("alpha_prompt"))


class AlphaDatasetMapper(DatasetMapper):
    """``DatasetMapper`` whose ``image`` is ``[4, H, W]``: the image plus its alpha (255 = region).

    The augmentations' transforms are applied to the image and, as a separate plane, to the alpha map, so
    resizing, cropping and flipping move both alike (never as one premultiplied RGBA image).

    Args:
        alpha_source: ``"whole"``, ``"gt_boxes"``, ``"gt_masks"`` or ``"prompt"``.
        **kwargs: as ``DatasetMapper``.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, alpha_source: str = "whole", **kwargs):
        if alpha_source not in SOURCES:
            raise ValueError(f"alpha_source must be one of {SOURCES}; got {alpha_source!r}")
        super().__init__(is_train, **kwargs)
        self.alpha_source = alpha_source

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["alpha_source"] = cfg.INPUT.get("ALPHA_SOURCE", "whole")
        return ret

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        alpha = alpha_mask(dataset_dict, self.alpha_source, *image.shape[:2])
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        # The same geometric transforms move alpha as its own plane (PIL would resize an RGBA image
        # premultiplied, blackening the image outside the region; a 2-D uint8 plane resizes as mode "L",
        # bilinear); photometric ones (brightness, contrast...) leave it alone, as they leave masks.
        alpha, photometric = np.rint(alpha * 255).astype(np.uint8), (T.ColorTransform, T.BlendTransform)
        for t in transforms.transforms:
            alpha = t.apply_segmentation(alpha) if isinstance(t, photometric) else t.apply_image(alpha)
        image = np.concatenate([aug_input.image, alpha.astype(aug_input.image.dtype)[..., None]], axis=2)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict
