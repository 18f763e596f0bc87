"""timm data for the alphaclip_* models: RGBA-safe transforms, an image + mask folder, a short fine-tuning run."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from PIL import Image  # noqa: E402

import alphaclip_plugins.integrations.timm  # noqa: E402, F401
from alphaclip_plugins.core.alpha import ALPHA_BACKGROUND, ALPHA_FOREGROUND, CLIP_MEAN, CLIP_STD  # noqa: E402
from alphaclip_plugins.integrations import timm_transforms as tt  # noqa: E402

TINY = "alphaclip_vit_tiny_patch8_32"
H, W = 45, 70  # non-square: every path resizes and crops


def _scene(seed: int = 0):
    """A textured RGB image and a box mask (uint8 0/255) on its left part."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    texture = np.stack([(xx * 7 + yy * 3) % 256, (yy * 11) % 256, (xx * 5 + 40) % 256], -1)
    rgb = np.clip(texture + rng.integers(-30, 30, (H, W, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((H, W), np.uint8)
    mask[8:36, 18:40] = 255
    return Image.fromarray(rgb), mask


def _cfg(model_name: str = TINY):
    return timm.data.resolve_data_config({}, model=timm.create_model(model_name))


def _outside(alpha: torch.Tensor) -> torch.Tensor:
    return alpha < ALPHA_BACKGROUND + 1e-4


def test_eval_rgb_equals_timm_on_rgb_alone_and_alpha_is_the_mask():
    cfg = _cfg()
    image, mask = _scene()
    rgba = image.copy()
    rgba.putalpha(Image.fromarray(mask))
    x = tt.create_transform(**cfg)(rgba)
    assert x.shape == (4, 32, 32)
    rgb_cfg = dict(cfg, input_size=(3, 32, 32), mean=CLIP_MEAN, std=CLIP_STD)
    ref = timm.data.create_transform(**rgb_cfg)(image)  # the same geometry on RGB alone
    outside = _outside(x[3])
    assert outside.float().mean() > 0.3
    assert (x[:3] - ref).abs()[:, outside].mean() < 0.01
    # The bug the drop-in avoids: timm's own transform on the RGBA image blackens RGB outside the region.
    theirs = timm.data.create_transform(**cfg)(rgba)
    assert (theirs[:3] - ref).abs()[:, outside].mean() > 0.5
    # Alpha: the box, scaled by 32/45 about the top-left, centre-cropped horizontally: (70*32/45 - 32)/2 = 8.9 px.
    s, dx = 32 / H, (W * 32 / H - 32) / 2
    inside = x[3, round(8 * s) + 1 : round(36 * s) - 1, round(18 * s - dx) + 1 : round(40 * s - dx) - 1]
    assert inside.numel() > 50 and torch.allclose(inside, torch.tensor(ALPHA_FOREGROUND), atol=1e-4)
    assert torch.allclose(x[3, :, : round(18 * s - dx) - 1], torch.tensor(ALPHA_BACKGROUND), atol=1e-4)


def test_pairs_rgba_and_rgb_agree():
    tf = tt.create_transform(**_cfg())
    image, mask = _scene()
    rgba = image.copy()
    rgba.putalpha(Image.fromarray(mask))
    pair = tf((image, mask))
    assert torch.equal(pair, tf(rgba))
    assert torch.equal(tf((image, mask > 0)), pair)  # bool and 0/255 masks mean the same
    whole = tf(image)
    assert torch.equal(whole[:3], pair[:3]) and torch.allclose(whole[3], torch.tensor(ALPHA_FOREGROUND))
    with pytest.raises(ValueError, match="values in"):
        tf((image, mask.astype(np.float32)))  # a float 0-255 mask
    with pytest.raises(ValueError, match="4 values"):
        tt.create_transform(input_size=32, mean=CLIP_MEAN, std=CLIP_STD)


def _seeded(tf, sample, seed: int) -> torch.Tensor:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return tf(sample)


def test_training_moves_rgb_and_alpha_together():
    """The region is painted red in the image: after random crops and flips, red pixels are the region."""
    image, mask = _scene()
    rgb = np.array(image)
    rgb[..., 1] = np.maximum(rgb[..., 1], 120)  # no red in the texture
    rgb[mask > 0] = (255, 0, 0)
    sample = (Image.fromarray(rgb), mask)
    tf = tt.create_transform(**_cfg(), is_training=True, hflip=0.5, vflip=0.5, color_jitter=0.0, scale=(0.3, 1.0))
    flips = set()
    for seed in range(12):
        x = _seeded(tf, sample, seed)
        red = (x[0] > 1.0) & (x[1] < -1.0)  # normalised red
        fg, bg = x[3] > ALPHA_FOREGROUND - 1e-3, x[3] < ALPHA_BACKGROUND + 1e-3
        if fg.any():
            assert red[fg].float().mean() > 0.95
        assert red[bg].float().mean() < 0.05
        flips.add(bool(red[:, :16].sum() > red[:, 16:].sum()))
    assert len(flips) == 2  # both flipped and unflipped samples were seen


def test_colour_ops_and_erasing_touch_rgb_only():
    image, mask = _scene()
    base = dict(_cfg(), is_training=True, color_jitter=0.0)
    plain = [_seeded(tt.create_transform(**base), (image, mask), seed) for seed in range(4)]
    for extra in (dict(auto_augment="rand-m9-mstd0.5-inc1"), dict(auto_augment="original"),
                  dict(color_jitter=0.4), dict(re_prob=1.0, re_mode="pixel")):
        tf = tt.create_transform(**dict(base, **extra))
        changed = 0.0
        for seed, ref in enumerate(plain):
            x = _seeded(tf, (image, mask), seed)
            assert torch.equal(x[3], ref[3]), extra  # the same geometry, alpha untouched
            changed = max(changed, (x[:3] - ref[:3]).abs().max().item())
        assert changed > 0.1, extra  # the op did change RGB
    ra = tt.create_transform(**dict(base, auto_augment="rand-m9-mstd0.5-inc1")).rgb_ops.transforms[0]
    assert ra.ops and not {op.name for op in ra.ops} & tt.GEOMETRIC_OPS


def _folder(tmp_path, n: int = 16):
    """An image folder (two classes: region in the top or bottom half of the same texture) and a mask folder."""
    for i in range(n):
        label = i % 2
        image, _ = _scene(seed=i)
        mask = np.zeros((H, W), np.uint8)
        rows = slice(0, H // 2) if label == 0 else slice(H // 2, H)
        mask[rows, 10 + i : 40 + i] = 255
        for root, im in (("images", image), ("masks", Image.fromarray(mask))):
            d = tmp_path / root / f"class{label}"
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"{i:03d}.{'jpg' if root == 'images' else 'png'}")
    return str(tmp_path / "images"), str(tmp_path / "masks")


def test_image_and_mask_folder_with_timm_loader(tmp_path):
    root, masks = _folder(tmp_path)
    cfg = _cfg()
    for prefetch in (False, True):
        dataset = tt.AlphaImageFolder(root, masks)
        loader = tt.create_loader(dataset, cfg["input_size"], 4, is_training=False, use_prefetcher=prefetch,
                                  device=torch.device("cpu"), mean=cfg["mean"], std=cfg["std"],
                                  interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"])
        x, y = next(iter(loader))
        assert x.shape == (4, 4, 32, 32) and x.dtype == torch.float32
        assert y.tolist() == [dataset.reader.samples[i][1] for i in range(4)]
        ref = tt.create_transform(**cfg)((Image.open(dataset.filename(0, absolute=True)), np.array(
            Image.open(dataset.mask_path(0)))))
        assert (x[0] - ref).abs().max() < 0.008, prefetch  # the prefetcher carries alpha as uint8: half a level
    (tmp_path / "masks" / "class0" / "000.png").unlink()
    with pytest.raises(FileNotFoundError, match="missing_mask='whole'"):
        tt.AlphaImageFolder(root, masks)[0]
    whole = tt.AlphaImageFolder(root, masks, missing_mask="whole", transform=tt.create_transform(**cfg))[0][0]
    assert torch.allclose(whole[3], torch.tensor(ALPHA_FOREGROUND))


def test_short_fine_tuning_with_timm_factories(tmp_path):
    """The two classes differ only by where the region is, so the loss can only fall through alpha."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    root, masks = _folder(tmp_path)
    model = timm.create_model(TINY, num_classes=2)
    with torch.no_grad():
        model.patch_embed.proj_alpha.weight.normal_(0, 0.05)  # a trained alpha conv, not CLIP's zero one
    cfg = timm.data.resolve_data_config({}, model=model)
    loader = tt.create_loader(tt.AlphaImageFolder(root, masks), cfg["input_size"], 8, is_training=True,
                              use_prefetcher=False, mean=cfg["mean"], std=cfg["std"], hflip=0.5, vflip=0.0,
                              scale=(0.8, 1.0), ratio=(1.0, 1.0), color_jitter=0.2, re_prob=0.25)
    optimizer = create_optimizer_v2(model, "adamw", lr=3e-3, weight_decay=0.01)
    epochs = 60
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=epochs, warmup_epochs=1, warmup_lr=1e-4)
    losses = []
    model.train()
    for epoch in range(epochs):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        scheduler.step(epoch + 1)
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8])
