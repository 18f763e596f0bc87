"""Alpha-safe timm data: ``create_transform`` / ``create_loader`` with timm's signatures, for RGBA input.

timm's own ``create_transform`` must not see RGBA PIL images: PIL resizes them with premultiplied alpha, so
every pixel outside the region turns black (and RandAugment refuses mode RGBA). These drop-ins keep RGB and
alpha as separate planes::

    from alphaclip_plugins.integrations.timm_transforms import create_transform
    tf = create_transform(**timm.data.resolve_data_config({}, model=model), is_training=False)
    x = tf(rgb_image)            # whole image          -> [4, H, W]
    x = tf((rgb_image, mask))    # image and its region -> [4, H, W]
    x = tf(rgba_image)           # alpha band = region (255 inside)

Geometry (resize, crops, flips, padding) moves RGB (``interpolation``) and the mask (bilinear) with the same
parameters; colour jitter, AutoAugment/RandAugment (without their rotate/shear/translate ops, which would
move the image off its region) and random erasing touch RGB only. The alpha plane is encoded with the 4th
mean/std value: ``(m - 0.5) / 0.26``.
"""
from __future__ import annotations

import glob
import math
import os
import random
from typing import Any, Optional, Sequence, Tuple, Union

from . import require

require("timm", "timm")

import numpy as np  # noqa: E402
import timm.data  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from PIL import Image  # noqa: E402
from timm.data import ImageDataset  # noqa: E402
from timm.data.random_erasing import RandomErasing  # noqa: E402
from timm.data.transforms import (  # noqa: E402
    CenterCropOrPad, RandomResizedCropAndInterpolation, ResizeKeepRatio, str_to_interp_mode,
)
from timm.data.transforms_factory import transforms_imagenet_train  # noqa: E402
from torchvision import transforms  # noqa: E402

from ..core.alpha import RGBA_MEAN, RGBA_STD, mask_to_float  # noqa: E402

__all__ = ["AlphaImageFolder", "AlphaTransform", "create_transform", "create_loader", "split_sample"]

#: AutoAugment/RandAugment ops that move pixels: they are dropped, as they would misalign RGB and region.
GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"})

Size = Union[int, Tuple[int, int], Tuple[int, int, int]]


def split_sample(sample: Any) -> Tuple[Image.Image, Optional[Image.Image]]:
    """A sample -> ``(RGB PIL image, mask as a float PIL image (mode F, 1 = region) or None = whole image)``.

    Accepts a PIL image (an alpha band, as in RGBA or LA, is the region: 255 inside), or ``(image, mask)``
    with a mask in any form :func:`~alphaclip_plugins.core.alpha.mask_to_float` takes (bool, 0/1 or 0-255
    uint8, float in [0, 1], PIL mode L/1) or None.
    """
    mask: Any = None
    if isinstance(sample, (tuple, list)):
        if len(sample) != 2:
            raise ValueError(f"a sample pair must be (image, mask); got {len(sample)} items")
        sample, mask = sample
    if isinstance(sample, np.ndarray):
        sample = Image.fromarray(sample)
    if not isinstance(sample, Image.Image):
        raise TypeError(f"images must be PIL images (or uint8 numpy [H, W, 3]); got {type(sample).__name__}")
    if "A" in sample.getbands() or "transparency" in sample.info:
        if mask is not None:
            raise ValueError("got an image with an alpha band and a separate mask; pass one or the other")
        sample = sample.convert("RGBA")
        mask = sample.getchannel("A")
    rgb = sample.convert("RGB")  # drops alpha as it is: RGB is never premultiplied
    if mask is None:
        return rgb, None
    m = mask_to_float(mask)
    if m.shape != (rgb.height, rgb.width):
        raise ValueError(
            f"mask has shape {m.shape} but the image is {(rgb.height, rgb.width)}; "
            f"pass a mask of the image's height and width"
        )
    return rgb, Image.fromarray(m, mode="F")


def _hw(size: Size) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return tuple(size[-2:])  # type: ignore[return-value]


class AlphaTransform:
    """RGB image + mask -> ``[4, H, W]``: see the module docstring; built by :func:`create_transform`."""

    def __init__(self, img_size: Tuple[int, int], is_training: bool, mean: Sequence[float], std: Sequence[float],
                 interpolation: str, rgb_ops: Any = None, eval_geometry: Optional[Tuple[Any, Any]] = None,
                 scale: Tuple[float, float] = (0.08, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, vflip: float = 0.0, erasing: Optional[RandomErasing] = None,
                 use_prefetcher: bool = False, normalize: bool = True):
        self.img_size, self.is_training, self.interpolation = img_size, is_training, interpolation
        self.mean, self.std = tuple(mean), tuple(std)
        self.rgb_ops, self.eval_geometry, self.erasing = rgb_ops, eval_geometry, erasing
        self.scale, self.ratio, self.hflip, self.vflip = scale, ratio, hflip, vflip
        self.use_prefetcher, self.normalize = use_prefetcher, normalize

    def __call__(self, sample: Any) -> torch.Tensor:
        """A sample (see :func:`split_sample`) -> ``[4, H, W]``: normalised float, or uint8 for timm's prefetcher."""
        rgb, mask = split_sample(sample)
        if mask is None:
            mask = Image.new("F", rgb.size, 1.0)  # the whole image
        rgb, mask = self._geometry(rgb, mask)
        if self.rgb_ops is not None:
            rgb = self.rgb_ops(rgb)
        m = torch.from_numpy(np.array(mask, dtype=np.float32)).clamp_(0, 1)[None]  # [1, H, W]
        if self.use_prefetcher or not self.normalize:  # uint8 0-255, normalised (4 channels) by the loader
            pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)
            return torch.cat([pixels, (m * 255).round_().to(torch.uint8)])
        pixels = TF.normalize(TF.to_tensor(rgb), self.mean[:3], self.std[:3])
        if self.erasing is not None:
            pixels = self.erasing(pixels)
        return torch.cat([pixels, (m - self.mean[3]) / self.std[3]])

    def _geometry(self, rgb: Image.Image, mask: Image.Image) -> Tuple[Image.Image, Image.Image]:
        if not self.is_training:
            rgb_tf, mask_tf = self.eval_geometry
            return rgb_tf(rgb), mask_tf(mask)
        i, j, h, w = RandomResizedCropAndInterpolation.get_params(rgb, self.scale, self.ratio)
        mode = self.interpolation
        if mode == "random":
            mode = random.choice(("bilinear", "bicubic"))
        rgb = TF.resized_crop(rgb, i, j, h, w, list(self.img_size), str_to_interp_mode(mode))
        mask = TF.resized_crop(mask, i, j, h, w, list(self.img_size), TF.InterpolationMode.BILINEAR)
        if random.random() < self.hflip:
            rgb, mask = TF.hflip(rgb), TF.hflip(mask)
        if random.random() < self.vflip:
            rgb, mask = TF.vflip(rgb), TF.vflip(mask)
        return rgb, mask

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.img_size}, training={self.is_training}, "
                f"interpolation={self.interpolation}, rgb_ops={self.rgb_ops})")


def _eval_geometry(img_size: Tuple[int, int], crop_pct: float, crop_mode: str, interpolation: str,
                   mean: Sequence[float]) -> Tuple[Any, Any]:
    """timm's eval geometry (``transforms_imagenet_eval``), once for RGB and once for the mask (bilinear,
    padded with background)."""
    scale = tuple(math.floor(x / crop_pct) for x in img_size)

    def build(interp: str, fill: Any) -> Any:
        if crop_mode == "squash":
            return transforms.Compose([transforms.Resize(scale, str_to_interp_mode(interp)),
                                       transforms.CenterCrop(img_size)])
        if crop_mode == "border":
            return transforms.Compose([ResizeKeepRatio(scale, interpolation=interp, longest=1.0),
                                       CenterCropOrPad(img_size, fill=fill)])
        resize = (transforms.Resize(scale[0], str_to_interp_mode(interp)) if scale[0] == scale[1]
                  else ResizeKeepRatio(scale, interpolation=interp))
        return transforms.Compose([resize, transforms.CenterCrop(img_size)])

    if crop_mode not in ("center", "squash", "border"):
        raise ValueError(f"crop_mode must be 'center', 'squash' or 'border'; got {crop_mode!r}")
    return build(interpolation, [round(255 * v) for v in mean[:3]]), build("bilinear", 0)


def _rgb_ops(img_size: Tuple[int, int], mean: Sequence[float], std: Sequence[float], **kwargs: Any) -> Any:
    """timm's own colour stage (AutoAugment/RandAugment/AugMix, colour jitter, grayscale, blur) for RGB only,
    without the geometric AutoAugment ops."""
    _, secondary, _ = transforms_imagenet_train(img_size, mean=mean[:3], std=std[:3], separate=True, **kwargs)
    for t in secondary.transforms:
        if hasattr(t, "policy"):  # AutoAugment: sub-policies of ops
            t.policy = [[op for op in sub if op.name not in GEOMETRIC_OPS] for sub in t.policy]
        elif hasattr(t, "ops"):  # RandAugment, AugMix
            keep = [k for k, op in enumerate(t.ops) if op.name not in GEOMETRIC_OPS]
            weights = getattr(t, "choice_weights", None)
            if weights is not None:
                w = np.asarray(weights)[keep]
                t.choice_weights = w / w.sum()
            t.ops = [t.ops[k] for k in keep]
    return secondary if secondary.transforms else None


def create_transform(
    input_size: Size = 224, is_training: bool = False, no_aug: bool = False, train_crop_mode: Optional[str] = None,
    scale: Optional[Tuple[float, float]] = None, ratio: Optional[Tuple[float, float]] = None, hflip: float = 0.5,
    vflip: float = 0.0, color_jitter: Union[float, Tuple[float, ...]] = 0.4, color_jitter_prob: Optional[float] = None,
    grayscale_prob: float = 0.0, gaussian_blur_prob: float = 0.0, auto_augment: Optional[str] = None,
    interpolation: str = "bilinear", mean: Sequence[float] = RGBA_MEAN, std: Sequence[float] = RGBA_STD,
    re_prob: float = 0.0, re_mode: str = "const", re_count: int = 1, re_num_splits: int = 0,
    crop_pct: Optional[float] = None, crop_mode: Optional[str] = None, use_prefetcher: bool = False,
    normalize: bool = True, **kwargs: Any,
) -> AlphaTransform:
    """``timm.data.create_transform`` for the alphaclip_* models; same arguments, RGBA-safe.

    Args:
        input_size: ``(4, H, W)`` (from ``resolve_data_config``), ``(H, W)`` or an int.
        mean, std: four values (R, G, B, alpha); ``resolve_data_config({}, model=m)`` gives them.
        use_prefetcher / normalize=False: return uint8 ``[4, H, W]`` (alpha 255 = region) for timm's loader
            to normalise.
        other arguments: as timm's; the training crop is ``rrc`` only.

    Returns:
        A callable taking a PIL image, an RGBA PIL image or ``(image, mask)`` and returning ``[4, H, W]``.
    """
    unsupported = {k: v for k, v in kwargs.items() if v not in (None, False, 0)}
    if unsupported:
        raise ValueError(f"{sorted(unsupported)} are not supported by the alpha-safe transforms; leave them unset")
    if len(mean) != 4 or len(std) != 4:
        raise ValueError(
            f"mean and std need 4 values (R, G, B, alpha); got {len(mean)} and {len(std)}. "
            f"Use timm.data.resolve_data_config({{}}, model=model) for an alphaclip_* model"
        )
    img_size = _hw(input_size)
    common = dict(mean=mean, std=std, interpolation=interpolation, use_prefetcher=use_prefetcher,
                  normalize=normalize)
    if not is_training or no_aug:  # timm's no_aug training transform is a resize and centre crop (crop_pct 1)
        pct = 1.0 if is_training else (crop_pct or timm.data.DEFAULT_CROP_PCT)
        geometry = _eval_geometry(img_size, pct, crop_mode or "center", interpolation, mean)
        return AlphaTransform(img_size, False, eval_geometry=geometry, **common)
    if (train_crop_mode or "rrc") != "rrc":
        raise ValueError(f"train_crop_mode {train_crop_mode!r} is not supported; the alpha-safe crop is 'rrc'")
    rgb_ops = _rgb_ops(img_size, mean, std, hflip=0.0, vflip=0.0, color_jitter=color_jitter,
                       color_jitter_prob=color_jitter_prob, grayscale_prob=grayscale_prob,
                       gaussian_blur_prob=gaussian_blur_prob, auto_augment=auto_augment, interpolation=interpolation)
    erasing = None
    if re_prob > 0 and not use_prefetcher:  # with the prefetcher, create_loader erases (RGB only)
        erasing = RandomErasing(re_prob, mode=re_mode, max_count=re_count, num_splits=re_num_splits, device="cpu")
    return AlphaTransform(img_size, True, rgb_ops=rgb_ops, scale=tuple(scale or (0.08, 1.0)),
                          ratio=tuple(ratio or (3 / 4, 4 / 3)), hflip=hflip, vflip=vflip, erasing=erasing, **common)


def create_loader(dataset: Any, input_size: Size, batch_size: int, **kwargs: Any) -> Any:
    """``timm.data.create_loader`` with the alpha-safe transform: timm builds the loader (sampler, workers,
    collate, prefetcher that normalises the 4 channels), then the dataset's transform is replaced by
    :func:`create_transform` of the same arguments, and the prefetcher's random erasing touches RGB only.

    ``dataset`` must apply ``dataset.transform`` to samples :func:`split_sample` takes (e.g.
    :class:`AlphaImageFolder`).
    """
    loader = timm.data.create_loader(dataset, input_size, batch_size, **kwargs)
    transform_args = {k: kwargs[k] for k in _TRANSFORM_ARGS if k in kwargs}
    transform_args["use_prefetcher"] = kwargs.get("use_prefetcher", True)
    dataset.transform = create_transform(input_size, **transform_args)
    erasing = getattr(loader, "random_erasing", None)
    if erasing is not None:
        loader.random_erasing = _RGBOnly(erasing)
    return loader


_TRANSFORM_ARGS = (
    "is_training", "no_aug", "train_crop_mode", "scale", "ratio", "hflip", "vflip", "color_jitter",
    "color_jitter_prob", "grayscale_prob", "gaussian_blur_prob", "auto_augment", "interpolation", "mean", "std",
    "re_prob", "re_mode", "re_count", "crop_pct", "crop_mode",
)


class _RGBOnly:
    """Apply a batch transform (timm's ``RandomErasing``) to the RGB planes of ``[B, 4, H, W]`` only."""

    def __init__(self, fn: Any):
        self.fn = fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.fn(x[:, :3].contiguous()), x[:, 3:]], dim=1)


class AlphaImageFolder(ImageDataset):
    """timm's ``ImageDataset`` over a class-per-folder image tree, with each image's region mask read from a
    parallel tree: ``mask_root/<class>/<name>.<any image ext>`` for ``root/<class>/<name>.jpg``.

    Samples are ``(transform((image, mask)), target)``; with ``missing_mask="whole"`` an image without a mask
    is the whole image, otherwise a missing mask raises ``FileNotFoundError``.
    """

    def __init__(self, root: str, mask_root: str, missing_mask: str = "error", **kwargs: Any):
        if missing_mask not in ("error", "whole"):
            raise ValueError(f"missing_mask must be 'error' or 'whole'; got {missing_mask!r}")
        super().__init__(root, **kwargs)
        self.root, self.mask_root, self.missing_mask = root, mask_root, missing_mask

    def mask_path(self, index: int) -> Optional[str]:
        """The mask file of sample ``index`` (None when there is none and ``missing_mask="whole"``)."""
        stem = os.path.splitext(self.filename(index))[0]
        found = sorted(glob.glob(glob.escape(os.path.join(self.mask_root, stem)) + ".*"))
        if found:
            return found[0]
        if self.missing_mask == "whole":
            return None
        raise FileNotFoundError(
            f"no mask for {self.filename(index)} under {self.mask_root} (expected {stem}.png or another image "
            f"extension); add it, or pass missing_mask='whole' to read such images as whole images"
        )

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path = self.filename(index, absolute=True)
        target = self.reader.samples[index][1]  # (the reader's __getitem__ would open the file)
        with Image.open(path) as im:
            image = im.convert("RGB")
        mask_file = self.mask_path(index)
        mask = None
        if mask_file is not None:
            with Image.open(mask_file) as im:
                mask = im.copy()  # validated (single channel, 0/1 or 0-255) by split_sample
        sample = (image, mask)
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target
