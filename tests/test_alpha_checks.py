"""Alpha values are checked where data enters, not in the forward; direct tensor callers can opt in."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from alphaclip_plugins import check_alpha, check_alpha_in_forward, create_model
from alphaclip_plugins.core.alpha import ALPHA_FOREGROUND
from alphaclip_plugins.core.processor import RegionProcessor
from alphaclip_plugins.core.zeroshot import classify_regions
from conftest import random_alpha, random_alpha_conv_

BAD = [
    (torch.ones(1, 1, 32, 32) * 255, "encoded alpha lies in"),
    ((torch.rand(1, 1, 32, 32) > 0.5).float(), "raw"),
    (torch.zeros(1, 1, 32, 32), "all zeros"),
    (torch.full((1, 1, 32, 32), float("nan")), "NaN"),
]


@pytest.fixture
def forward_checks():
    previous = check_alpha_in_forward(True)
    yield
    check_alpha_in_forward(previous)


@pytest.mark.parametrize("alpha, match", BAD)
def test_check_alpha_refuses_unencoded_values(alpha, match):
    with pytest.raises(ValueError, match=match):
        check_alpha(alpha)
    check_alpha(random_alpha(2, 32))  # encoded alpha passes


@pytest.mark.parametrize("alpha, match", BAD)
def test_forward_does_not_check_unless_asked(tiny_model, alpha, match):
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tiny_model.encode_image(image, torch.randn(1, 1, 32, 32) * 3)  # timm's test inputs: no host sync, no check
    tiny_model.encode_image(image, alpha)
    previous = check_alpha_in_forward(True)
    try:
        with pytest.raises(ValueError, match=match):
            tiny_model.encode_image(image, alpha)
    finally:
        check_alpha_in_forward(previous)


def test_scripting_and_tracing_skip_the_opt_in_check(forward_checks):
    timm = pytest.importorskip("timm")
    import alphaclip_plugins.integrations.timm  # noqa: F401

    model = timm.create_model("alphaclip_vit_tiny_patch8_32").eval()
    with torch.no_grad():
        model.patch_embed.proj_alpha.weight.normal_(0, 0.05)
    rgba = torch.cat([torch.randn(2, 3, 32, 32), random_alpha(2, 32)], dim=1)
    traced = torch.fx.symbolic_trace(model)
    scripted = torch.jit.script(model)
    raw = torch.cat([rgba[:, :3], torch.ones(2, 1, 32, 32) * 255], dim=1)
    with torch.no_grad():
        ref = model(rgba)
        assert (traced(rgba) - ref).abs().max() < 1e-5 and (scripted(rgba) - ref).abs().max() < 1e-5
        assert (traced(raw) - scripted(raw)).abs().max() < 1e-4  # a captured graph has no Python checks
        with pytest.raises(ValueError, match="encoded alpha lies in"):
            model(raw)


def test_boundaries_take_raw_masks_and_refuse_bad_ones(tiny_model):
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    mask01 = np.zeros((40, 56), np.uint8)
    mask01[5:30, 10:40] = 1
    processor = RegionProcessor(32)
    a01 = processor(image, [mask01]).alpha
    assert torch.equal(processor(image, [mask01 * 255]).alpha, a01)  # 0/1 and 0-255 masks mean the same
    assert a01.max() == pytest.approx(ALPHA_FOREGROUND)
    with pytest.raises(ValueError, match="divide a 0-255 mask by 255"):
        processor(image, [mask01.astype(np.float32) * 255])

    class Unencoded(RegionProcessor):
        def alphas(self, regions, size):
            return (super().alphas(regions, size) > 0).float()  # forgets the encoding

    probs = classify_regions(tiny_model, image, [mask01], ["a", "b"], templates=["{}"])
    assert probs.shape == (1, 2)
    with pytest.raises(ValueError, match="raw"):
        classify_regions(tiny_model, image, [mask01], ["a", "b"], templates=["{}"], processor=Unencoded(32))
