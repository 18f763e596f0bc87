"""``AlphaCLIPImageProcessor``: images and their regions -> aligned 4-channel ``pixel_values``.

Geometry and alpha encoding are the core :class:`~alphaclip_plugins.core.processor.RegionProcessor`'s,
so a region gets the same alpha here as everywhere else in the package.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from ...core.alpha import CLIP_MEAN, CLIP_STD
from ...core.processor import RegionProcessor
from .compat import ImagesKwargs


class AlphaCLIPImagesKwargs(ImagesKwargs, total=False):
    regions: Any  # per image, a list of regions (masks, boxes, polygons, RLE, None = whole image)
    mode: Optional[str]  # "pad", "crop" or "squash"
    image_size: Optional[int]  # side of the square model input
    return_image_index: Optional[bool]  # also return which input image each sample came from


class AlphaCLIPImageProcessor(BaseImageProcessor):
    """Preprocess images with regions for Alpha-CLIP: one 4-channel sample per (image, region).

    Args:
        image_size: side of the square model input (the vision config's ``image_size``).
        mode: ``"pad"`` (pad to a square, then resize: the training geometry), ``"crop"`` (centre crop) or
            ``"squash"``; image and masks always share it.
        image_mean, image_std: RGB normalisation (OpenAI CLIP's by default).

    Example::

        processor = AlphaCLIPImageProcessor(image_size=224)
        batch = processor([img_a, img_b], regions=[[mask_a1, (10, 20, 90, 120)], [None]], return_tensors="pt")
        batch["pixel_values"].shape  # [3, 4, 224, 224]: two regions of img_a, img_b whole
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = AlphaCLIPImagesKwargs

    def __init__(
        self,
        image_size: int = 224,
        mode: str = "pad",
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        **kwargs: Any,
    ):
        for key in ("size", "crop_size"):  # derived from image_size; stale copies in a saved config are ignored
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        RegionProcessor(image_size, mode)  # validates mode now rather than at the first call
        self.image_size, self.mode = int(image_size), mode
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        # What code written for CLIPImageProcessor reads (e.g. LLaVA: crop_size["height"], image_mean).
        self.size = {"shortest_edge": self.image_size}
        self.crop_size = {"height": self.image_size, "width": self.image_size}

    def __call__(self, images: Any, regions: Any = None, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, regions=regions, **kwargs)

    def preprocess(
        self,
        images: Any,
        regions: Any = None,
        return_tensors: Optional[str] = None,
        mode: Optional[str] = None,
        image_size: Optional[int] = None,
        return_image_index: bool = False,
        **kwargs: Any,
    ) -> BatchFeature:
        """Preprocess images with their regions.

        Args:
            images: one image or a list (PIL, numpy ``[H, W, 3]``, torch ``[3, H, W]``).
            regions: for one image, its region or list of regions; for a list of images, one entry per image
                (a region or a list of regions). None = every image whole. A box is a tuple ``(x0, y0, x1, y1)``.
            return_tensors: ``"pt"``, ``"np"`` or None (torch tensors either way unless ``"np"``).
            mode, image_size: override the processor's geometry for this call.
            return_image_index: also return ``image_index [N]``, each sample's input image.
            **kwargs: options of other image processors (resize, crop, ...) are not used: geometry is
                ``mode`` and ``image_size``. Passing one with a value raises.

        Returns:
            ``pixel_values [N, 4, S, S]``: CLIP-normalised RGB and encoded alpha, N = number of regions.
        """
        used = {k: v for k, v in kwargs.items() if v is not None and k not in _IGNORED}
        if used:
            raise ValueError(
                f"AlphaCLIPImageProcessor does not take {sorted(used)}: its geometry is `mode` "
                f"('pad', 'crop', 'squash') and `image_size`; set those instead"
            )
        processor = RegionProcessor(
            image_size or self.image_size, mode or self.mode, mean=self.image_mean, std=self.image_std
        )
        batch = processor(images, regions)
        data: Dict[str, Any] = {"pixel_values": batch.rgba()}
        if return_image_index:
            data["image_index"] = batch.image_index
        return BatchFeature(data=data, tensor_type=return_tensors)

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        for key in ("size", "crop_size"):  # derived from image_size
            d.pop(key, None)
        return d


# Options that multimodal processors pass to every image processor; they are at their defaults here.
_IGNORED = {"do_convert_rgb", "data_format", "input_data_format", "device", "disable_grouping", "image_seq_length"}
