"""Every data path moves RGB and alpha through the same geometry, as separate planes (never a premultiplied
RGBA resize): RGB equals the path's output for the RGB alone, and the alpha is the region's mask.

The fixture is textured and non-square, so every path resizes it; its region is painted pure red, so the
alpha must be foreground exactly where the output is red.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from alphaclip_plugins.core.alpha import ALPHA_BACKGROUND, ALPHA_FOREGROUND, CLIP_MEAN, CLIP_STD
from alphaclip_plugins.core.processor import RegionProcessor
from conftest import import_or_skip

H, W, S = 45, 70, 32
BOX = (18, 8, 40, 36)  # x0, y0, x1, y1


def _scene():
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([(xx * 9 + yy * 5) % 200, 120 + (yy * 11) % 120, (xx * 5 + 40) % 256], -1).astype(np.uint8)
    mask = np.zeros((H, W), np.uint8)
    x0, y0, x1, y1 = BOX
    mask[y0:y1, x0:x1] = 255
    rgb[mask > 0] = (255, 0, 0)
    rgba = Image.fromarray(np.concatenate([rgb, mask[..., None]], -1), "RGBA")
    return rgb, mask, rgba


def _check(rgb_region: torch.Tensor, rgb_whole: torch.Tensor, alpha: torch.Tensor, rgb_scale=None) -> None:
    """rgb [3, S, S] (normalised with CLIP's mean/std unless ``rgb_scale`` maps it to [0, 1]), alpha [S, S]."""
    outside = alpha < ALPHA_BACKGROUND + 1e-3
    inside = alpha > ALPHA_FOREGROUND - 1e-3
    assert outside.float().mean() > 0.2 and inside.float().mean() > 0.05
    assert (rgb_region - rgb_whole).abs()[:, outside].mean() < 0.01  # RGB is the RGB-alone result
    x = rgb_scale(rgb_region) if rgb_scale else rgb_region * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(
        CLIP_MEAN)[:, None, None]
    red = (x[0] > 0.9) & (x[1] < 0.1) & (x[2] < 0.1)
    assert red[inside].float().mean() > 0.95 and red[outside].float().mean() < 0.02  # alpha is the region
    assert ((alpha >= ALPHA_BACKGROUND - 1e-4) & (alpha <= ALPHA_FOREGROUND + 1e-4)).all()


@pytest.mark.parametrize("mode", ["pad", "crop", "squash"])
def test_region_processor(mode):
    rgb, mask, rgba = _scene()
    processor = RegionProcessor(S, mode=mode)
    region, whole = processor(rgb, [mask]), processor(rgb)
    _check(region.pixel_values[0], whole.pixel_values[0], region.alpha[0, 0])
    assert torch.equal(processor(rgba, [mask]).pixel_values, region.pixel_values)  # an RGBA image's RGB as is


def test_hf_image_processor():
    import_or_skip("transformers")
    from alphaclip_plugins.integrations.hf import AlphaCLIPImageProcessor

    rgb, mask, rgba = _scene()
    processor = AlphaCLIPImageProcessor(image_size=S)
    region = processor(images=[Image.fromarray(rgb)], regions=[[mask]], return_tensors="pt")["pixel_values"][0]
    whole = processor(images=[Image.fromarray(rgb)], return_tensors="pt")["pixel_values"][0]
    _check(region[:3], whole[:3], region[3])


def test_trainer_sample_decoder(tmp_path):
    from alphaclip_plugins.train.data import Record, SampleDecoder

    rgb, mask, _ = _scene()
    Image.fromarray(rgb).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    decode = SampleDecoder(RegionProcessor(S))
    region = {"mask": str(tmp_path / "mask.png")}
    pixels, alpha, _ = decode(Record(str(tmp_path / "image.png"), "a red box", region), whole=False)
    whole, _, _ = decode(Record(str(tmp_path / "image.png"), "a red box"), whole=False)
    _check(pixels, whole, alpha[0])


def test_timm_transforms():
    import_or_skip("timm")
    import timm

    from alphaclip_plugins.integrations import timm_transforms as tt

    rgb, mask, rgba = _scene()
    cfg = dict(input_size=(4, S, S), interpolation="bicubic", crop_pct=1.0)
    region = tt.create_transform(**cfg)(rgba)
    whole = timm.data.create_transform(**cfg, mean=CLIP_MEAN, std=CLIP_STD)(Image.fromarray(rgb))
    _check(region[:3], whole, region[3])


def test_detectron2_dataset_mapper(tmp_path):
    import_or_skip("detectron2", allow_missing=True)  # not on PyPI: skips even under CI
    from detectron2.data import transforms as T

    from alphaclip_plugins.integrations.detectron2 import AlphaDatasetMapper

    rgb, mask, _ = _scene()
    Image.fromarray(rgb).save(tmp_path / "image.png")
    x0, y0, x1, y1 = BOX
    record = dict(file_name=str(tmp_path / "image.png"), height=H, width=W, alpha_prompt=[x0, y0, x1, y1])
    augs = [T.ResizeShortestEdge(S, max_size=1000), T.RandomFlip(prob=1.0)]
    out = AlphaDatasetMapper(is_train=False, augmentations=augs, image_format="RGB", alpha_source="prompt")(record)
    image = out["image"].float()
    assert image.shape[0] == 4 and min(image.shape[1:]) == S
    rgb_alone = T.AugInput(rgb)
    T.AugmentationList(augs)(rgb_alone)
    ref = torch.as_tensor(rgb_alone.image.transpose(2, 0, 1).copy()).float()
    alpha = (image[3] / 255 - 0.5) / 0.26
    _check(image[:3] / 255, ref / 255, alpha, rgb_scale=lambda t: t)


def test_mmdet_pipeline():
    import_or_skip("mmdet")
    from mmdet.datasets.transforms import RandomFlip, Resize

    from alphaclip_plugins.integrations.mmdet import AddAlphaChannel

    rgb, mask, _ = _scene()
    x0, y0, x1, y1 = BOX

    def run(add_alpha: bool) -> np.ndarray:
        results = dict(img=rgb.copy(), img_shape=(H, W), ori_shape=(H, W), alpha_prompt=[x0, y0, x1, y1])
        steps = ([AddAlphaChannel(source="prompt")] if add_alpha else []) + [
            Resize(scale=(S * 3, S), keep_ratio=True), RandomFlip(prob=1.0)]
        for step in steps:
            results = step(results)
        return results["img"]

    region, whole = run(True), run(False)
    to_t = lambda a: torch.as_tensor(np.ascontiguousarray(a.transpose(2, 0, 1))).float() / 255  # noqa: E731
    alpha = (to_t(region)[3] - 0.5) / 0.26
    _check(to_t(region)[:3], to_t(whole), alpha, rgb_scale=lambda t: t)
