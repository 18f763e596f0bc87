"""Detectron2 data with alpha: ``AlphaDatasetMapper`` (an alpha channel moved by the image's transforms),
COCO datasets that carry ``images[i]["alpha_prompt"]``, and novel classes held out of training dicts."""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Dict, List, Literal, Optional, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

from ...detection.inputs import PROMPT_KEY, missing_prompt_error, sample_alpha

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
        alpha_source: ``"whole"``, ``"gt_boxes"``, ``"gt_masks"`` or ``"prompt"`` (``dataset_dict["alpha_prompt"]``,
            which :func:`register_alpha_coco_instances` copies from the COCO JSON's ``images[i]``).
        alpha_fallback: what ``"prompt"`` does for a dict without a prompt: ``"error"`` or ``"whole"``
            (``INPUT.ALPHA_FALLBACK`` in a yacs config).
        **kwargs: as ``DatasetMapper``.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, alpha_source: str = "whole",
                 alpha_fallback: Literal["error", "whole"] = "error", **kwargs):
        if alpha_source not in SOURCES:
            raise ValueError(f"alpha_source must be one of {SOURCES}; got {alpha_source!r}")
        if alpha_fallback not in ("error", "whole"):
            raise ValueError(f"alpha_fallback must be 'error' or 'whole'; got {alpha_fallback!r}")
        super().__init__(is_train, **kwargs)
        self.alpha_source, self.alpha_fallback = alpha_source, alpha_fallback

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["alpha_source"] = cfg.INPUT.get("ALPHA_SOURCE", "whole")
        ret["alpha_fallback"] = cfg.INPUT.get("ALPHA_FALLBACK", "error")
        return ret

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        if self.alpha_source == "prompt" and dataset_dict.get(PROMPT_KEY) is None and self.alpha_fallback == "error":
            raise missing_prompt_error(dataset_dict["file_name"], "register_alpha_coco_instances",
                                       "INPUT.ALPHA_FALLBACK 'whole' (AlphaDatasetMapper(alpha_fallback='whole'))")
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


def load_alpha_coco_json(json_file: str, image_root: str, dataset_name: Optional[str] = None,
                         extra_annotation_keys: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """detectron2's ``load_coco_json``, plus each image's ``images[i]["alpha_prompt"]`` (when present) as
    ``dataset_dict["alpha_prompt"]``, in the image's pixels (``load_coco_json`` keeps image ids, not fields)."""
    dicts = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys)
    with open(json_file) as f:
        prompts = {im["id"]: im[PROMPT_KEY] for im in json.load(f)["images"] if im.get(PROMPT_KEY) is not None}
    for d in dicts:
        if d["image_id"] in prompts:
            d[PROMPT_KEY] = prompts[d["image_id"]]
    return dicts


def register_alpha_coco_instances(name: str, metadata: Dict[str, Any], json_file: str, image_root: str) -> None:
    """``register_coco_instances`` whose dicts carry the images' alpha prompts (:func:`load_alpha_coco_json`)."""
    if name in DatasetCatalog:
        raise ValueError(f"dataset {name!r} is already registered; pick another name or DatasetCatalog.remove it")
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    DatasetCatalog.register(name, lambda: load_alpha_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata)


def hold_out_classes(dataset_dicts: Sequence[Dict[str, Any]], classes: Sequence[str], held_out: Sequence[str],
                     filter_empty: bool = True) -> List[Dict[str, Any]]:
    """Dataset dicts without the annotations of the ``held_out`` class names (open-vocabulary training on
    base classes); the other annotations keep their ``category_id``.

    Args:
        classes: the dataset's ``thing_classes``, which ``category_id`` indexes.
        filter_empty: drop the images left without annotations.
    """
    unknown = [c for c in held_out if c not in classes]
    if unknown:  # no annotation can carry them: nothing to drop, but likely a misspelt name
        logging.getLogger(__name__).warning("held-out classes %s are not among the dataset's %s", unknown,
                                            list(classes))
    drop = {i for i, c in enumerate(classes) if c in held_out}
    out = []
    for d in dataset_dicts:
        if "annotations" in d and drop:
            d = {**d, "annotations": [a for a in d["annotations"] if a["category_id"] not in drop]}
            if filter_empty and not d["annotations"]:
                continue
        out.append(d)
    return out
