"""Shared fixtures: tiny seeded models and encoded alpha maps. Everything runs on CPU without downloads."""
from __future__ import annotations

import pytest
import torch

from alphaclip_plugins.core.alpha import encode_alpha
from alphaclip_plugins.core.factory import create_model

collect_ignore = ["timm_suite"]  # timm's own test_models.py runs there, through scripts/timm_suite.sh


def random_alpha_conv_(model: torch.nn.Module, seed: int = 1) -> None:
    """Give a model a non-zero ``conv1_alpha`` so that alpha changes its output (a fresh one is zero)."""
    visual = getattr(model, "visual", model)
    conv = getattr(visual, "conv1_alpha", None) or visual.conv1.alpha  # core tower, or alphafied open_clip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = conv.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.05)


def random_alpha(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Encoded alpha ``[B, 1, S, S]`` of random rectangular regions."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, 1, size, size)
    for b in range(batch):
        y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        mask[b, :, y0 : y0 + size // 2, x0 : x0 + size // 2] = 1
    return encode_alpha(mask)


@pytest.fixture
def tiny_model():
    """A tiny two-tower Alpha-CLIP (32 px, patch 8) with a non-zero alpha conv, in eval mode."""
    model = create_model("tiny")
    random_alpha_conv_(model)
    return model


def import_or_skip(module: str, reason: str = "", allow_missing: bool = False):
    """``pytest.importorskip``, except under CI (``CI=true``), where a missing framework is a failure
    (unless ``allow_missing``: detectron2, which is not on PyPI, so CI cannot install it)."""
    import importlib
    import os

    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and not allow_missing:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason or None)


def shape_scenes(count: int = 12, seed: int = 0, distractors: int = 3):
    """Synthetic detection scenes for the embedded model: ``(image [H, W, 3] uint8, gt boxes, gt labels,
    distractor boxes)``; labels index ``alphaclip_plugins.train.synthetic.labels()``."""
    import numpy as np

    from alphaclip_plugins.train.synthetic import draw_image, labels

    names = labels()
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        scene = draw_image(rng)
        image = np.asarray(scene.image)
        gt = [list(s.box) for s in scene.shapes]
        h, w = image.shape[:2]
        extra = []
        for _ in range(distractors):  # background boxes and boxes straddling two shapes
            x0, y0 = rng.integers(0, w - 12), rng.integers(0, h - 12)
            extra.append([int(x0), int(y0), int(min(w, x0 + rng.integers(8, 40))), int(min(h, y0 + rng.integers(8, 40)))])
        scenes.append((image, gt, [names.index(s.label) for s in scene.shapes], extra))
    return scenes


#: The core "tiny" vision tower as a transformers CLIPVisionConfig (keyword arguments).
HF_TINY_VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8, projection_dim=32)
