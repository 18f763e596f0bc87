"""timm integration: registered models load every checkpoint layout and match the core tower."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from checkpoint_files import official_file, openai_file  # noqa: E402
from conftest import import_or_skip  # noqa: E402
timm = import_or_skip("timm")

from PIL import Image  # noqa: E402

import alphaclip_plugins.integrations.timm as atimm  # noqa: E402
from alphaclip_plugins.core.alpha import ALPHA_BACKGROUND, ALPHA_FOREGROUND, RGBA_MEAN, RGBA_STD  # noqa: E402
from alphaclip_plugins.core.checkpoint import export_state_dict  # noqa: E402
from alphaclip_plugins.core.config import get_config  # noqa: E402
from alphaclip_plugins.core.convert import from_alphaclip  # noqa: E402
from alphaclip_plugins.core.factory import create_model  # noqa: E402
from alphaclip_plugins.core.io import CheckpointError, save_safetensors  # noqa: E402
from alphaclip_plugins.core.vision import VisionTransformer  # noqa: E402
from conftest import random_alpha, random_alpha_conv_  # noqa: E402

TINY = "alphaclip_vit_tiny_patch8_32"
TOL = 1e-5
LAYERS = 3  # the timm tiny variant has 3 blocks (timm's feature tests take the last 3); the core "tiny" has 2


def _create(tag: str, file: Path, **kwargs) -> nn.Module:
    return timm.create_model(f"{TINY}.{tag}", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)


def _inputs(batch: int = 2, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(batch, 3, size, size, generator=g)
    alpha = random_alpha(batch, size, seed)
    return rgb, alpha, torch.cat([rgb, alpha], dim=1)


@pytest.fixture
def tiny_model():
    """The core two-tower model with the timm tiny variant's depth, a non-zero alpha conv."""
    model = create_model("tiny", vision_layers=LAYERS)
    random_alpha_conv_(model)
    return model


@pytest.fixture
def tower(tiny_model) -> VisionTransformer:
    return tiny_model.visual


def test_models_and_tags_are_registered():
    names = set(timm.list_models("alphaclip_*"))
    assert {"alphaclip_vit_base_patch16_224", "alphaclip_vit_large_patch14_224", "alphaclip_vit_large_patch14_336",
            TINY} <= names
    tags = {t.split(".")[1] for t in timm.list_models("alphaclip_vit_base_patch16_224", include_tags=True)}
    assert tags == {"grit1m", "grit20m", "grit1m_mim", "openai"}
    cfg = timm.models.get_pretrained_cfg("alphaclip_vit_large_patch14_336.grit20m")
    assert cfg.input_size == (4, 336, 336) and cfg.num_classes == 768
    assert any("clip_l14_336_grit_20m_4xe.pth" in n for n in cfg.notes)
    assert timm.models.get_pretrained_cfg("alphaclip_vit_base_patch16_224.grit1m_mim").tag == "grit1m_mim"
    listed = set(timm.list_pretrained("alphaclip*"))
    assert "alphaclip_vit_base_patch16_224.grit1m" in listed and "alphaclip_vit_large_patch14_336.openai" in listed
    assert not any(name.startswith(TINY) for name in listed)  # the test variant has no released weights
    release = timm.models.get_pretrained_cfg("alphaclip_vit_large_patch14_224.grit20m")
    assert release.paper_ids == "arXiv:2312.03818" and release.license and release.paper_name
    assert timm.models.get_pretrained_cfg("alphaclip_vit_base_patch16_224.openai").paper_ids == "arXiv:2103.00020"


def test_official_file_matches_core(tower, tmp_path):
    model = _create("grit1m", official_file(tower, tmp_path / "clip_tiny_grit1m.pth")).eval()
    rgb, alpha, rgba = _inputs()
    with torch.no_grad():
        assert (model(rgba) - tower(rgb, alpha)).abs().max() < TOL
        assert (model(rgb) - tower(rgb)).abs().max() < TOL  # 3 channels: the whole image
        feats = model.forward_features(rgba)
        assert (feats - tower.forward_features(rgb, alpha)).abs().max() < TOL
        assert (model.forward_head(feats, pre_logits=True) - feats[:, 0]).abs().max() == 0
        ours = model.forward_intermediates(rgba, indices=[0, 1], intermediates_only=True)
        ref = tower.forward_intermediates(rgb, alpha, indices=[0, 1], intermediates_only=True)
        assert all((a - b).abs().max() < TOL for a, b in zip(ours, ref))
    assert torch.equal(model.patch_embed.proj_alpha.weight, tower.conv1_alpha.weight)
    assert torch.equal(model.head.weight, tower.proj.t()) and not model.head.bias.any()


@pytest.mark.parametrize("torchscript", [False, True])
def test_openai_file_gives_zero_alpha_and_equals_clip(tiny_model, tmp_path, torchscript):
    model = _create("openai", openai_file(tiny_model, tmp_path / "ViT-tiny.pt", torchscript)).eval()
    assert not model.patch_embed.proj_alpha.weight.any()
    rgb, alpha, rgba = _inputs()
    with torch.no_grad():
        tiny_model.visual.conv1_alpha.weight.zero_()
        assert (model(rgba) - tiny_model.encode_image(rgb)).abs().max() < TOL  # zero alpha conv: plain CLIP


def test_timm_safetensors_loads_exactly(tower, tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(export_state_dict(tower, "timm"), path)
    loaded = _create("grit20m", path).state_dict()
    for key, value in export_state_dict(tower, "timm").items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("fmt", ["official", "hf", "open_clip", "alphaclip", "timm"])
def test_filter_accepts_every_layout(tiny_model, fmt):
    sd = from_alphaclip(tiny_model.state_dict(), fmt)
    if fmt == "open_clip":
        sd = {"module." + k: v for k, v in sd.items()}  # DDP-saved training checkpoints
    model = timm.create_model(TINY).eval()
    model.load_state_dict(atimm.checkpoint_filter_fn(sd, model), strict=True)
    rgb, alpha, rgba = _inputs()
    with torch.no_grad():
        assert (model(rgba) - tiny_model.encode_image(rgb, alpha)).abs().max() < TOL


def test_tower_without_projection_loads_without_head(tiny_model):
    sd = from_alphaclip(tiny_model.state_dict(), "hf")
    del sd["visual_projection.weight"]  # a CLIPVisionModel: no image projection
    model = timm.create_model(TINY, num_classes=0).eval()
    model.load_state_dict(atimm.checkpoint_filter_fn(sd, model), strict=True)
    rgb, alpha, rgba = _inputs()
    with torch.no_grad():
        assert (model(rgba) - tiny_model.visual.forward_features(rgb, alpha)[:, 0]).abs().max() < TOL


def test_missing_file_names_the_release_file():
    with pytest.raises(ValueError, match=r"clip_b16_grit1m_fultune_8xe\.pth.*pretrained_cfg_overlay"):
        timm.create_model("alphaclip_vit_base_patch16_224.grit1m", pretrained=True)


def test_other_architecture_is_refused(tmp_path):
    wide = create_model("tiny", vision_width=128, vision_layers=LAYERS)
    with pytest.raises(CheckpointError, match="vision_width"):
        _create("grit1m", official_file(wide.visual, tmp_path / "wide.pth"))


def test_data_config_normalises_four_channels():
    from alphaclip_plugins.integrations.timm_transforms import create_transform

    model = timm.create_model(TINY)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (4, 32, 32)
    assert cfg["mean"] == pytest.approx(RGBA_MEAN) and cfg["std"] == pytest.approx(RGBA_STD)
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., 3][:, :20] = 255  # left half is the region
    x = create_transform(**cfg)(Image.fromarray(rgba, "RGBA"))
    assert x.shape == (4, 32, 32)
    assert x[3, :, :8] == pytest.approx(ALPHA_FOREGROUND, abs=1e-4)
    assert x[3, :, -8:] == pytest.approx(ALPHA_BACKGROUND, abs=1e-4)


def test_three_channels_are_the_whole_image(tower):
    model = timm.create_model(TINY).eval()
    model.load_state_dict(atimm.checkpoint_filter_fn(export_state_dict(tower, "official"), model))
    rgb, _, _ = _inputs()
    with torch.no_grad():
        whole = model(torch.cat([rgb, torch.full_like(rgb[:, :1], ALPHA_FOREGROUND)], dim=1))
        outside = model(torch.cat([rgb, torch.full_like(rgb[:, :1], ALPHA_BACKGROUND)], dim=1))
        assert (model(rgb) - whole).abs().max() < TOL
        assert (model(rgb) - outside).abs().max() > 1e-3


def test_features_only(tower, tmp_path):
    default = timm.create_model(TINY, features_only=True)
    assert len(default.feature_info.channels()) == 3  # timm's feature tests expect 3 levels by default
    feats = _create("grit1m", official_file(tower, tmp_path / "t.pth"), features_only=True, out_indices=(0, 1)).eval()
    assert feats.feature_info.reduction() == [8, 8] and feats.feature_info.channels() == [64, 64]
    rgb, alpha, rgba = _inputs()
    with torch.no_grad():
        out = feats(rgba)
        ref = tower.forward_intermediates(rgb, alpha, indices=(0, 1), intermediates_only=True)
    assert [tuple(o.shape) for o in out] == [(2, 64, 4, 4)] * 2
    assert all((a - b).abs().max() < TOL for a, b in zip(out, ref))


def test_grad_checkpointing_gives_same_outputs_and_grads(tower):
    model = timm.create_model(TINY)
    model.load_state_dict(atimm.checkpoint_filter_fn(export_state_dict(tower, "timm"), model))
    _, _, rgba = _inputs()

    def run(enable: bool):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        out = model(rgba)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (a, ga), (b, gb) = run(False), run(True)
    assert (a - b).abs().max() < TOL
    assert all((ga[n] - gb[n]).abs().max() < TOL for n in ga)
    assert ga["patch_embed.proj_alpha.weight"].abs().sum() > 0


def test_classifier_fine_tuning(tower, tmp_path):
    model = _create("grit1m", official_file(tower, tmp_path / "t.pth"), num_classes=10)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 10
    assert torch.equal(model.patch_embed.proj_alpha.weight, tower.conv1_alpha.weight)
    _, _, rgba = _inputs()
    logits = model(rgba)
    assert logits.shape == (2, 10)
    nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
    assert model.patch_embed.proj_alpha.weight.grad.abs().sum() > 0 and model.head.weight.grad is not None
    model.reset_classifier(5)
    assert model(rgba).shape == (2, 5)
    model.reset_classifier(0)
    assert model(rgba).shape == (2, 64)


def test_input_conv_adaptation_never_runs(tower, monkeypatch):
    calls = []
    monkeypatch.setattr("timm.models._builder.adapt_input_conv", lambda *a, **k: calls.append(a) or a[1])
    sd = export_state_dict(tower, "official")
    # The in-memory state dict path goes through timm's generic loader, which adapts input convs.
    model = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd))
    assert not calls
    assert torch.equal(model.patch_embed.proj_alpha.weight, tower.conv1_alpha.weight)
    assert torch.equal(model.patch_embed.proj.weight, tower.conv1.weight)
    with pytest.raises(ValueError, match="in_chans=4"):
        timm.create_model(TINY, in_chans=3)


def test_dynamic_img_size_and_set_input_size(tower):
    sd = export_state_dict(tower, "timm")
    rgb, alpha, rgba = _inputs(size=48)
    dynamic = timm.create_model(TINY, dynamic_img_size=True).eval()
    dynamic.load_state_dict(atimm.checkpoint_filter_fn(sd, dynamic))
    resized = timm.create_model(TINY).eval()
    resized.load_state_dict(atimm.checkpoint_filter_fn(sd, resized))
    resized.set_input_size(img_size=(48, 48))
    with torch.no_grad():
        ref = tower(rgb, alpha)
        assert (dynamic(rgba) - ref).abs().max() < TOL
        assert (resized(rgba) - ref).abs().max() < TOL
        assert dynamic(rgba[..., :40]).shape == (2, 32)  # non-square input
    with pytest.raises(ValueError, match="48x48 but the model takes 32x32"):
        timm.create_model(TINY)(rgba)


@pytest.mark.slow
def test_full_size_b16_official_weights_match_core():
    torch.manual_seed(0)
    core = VisionTransformer(get_config("ViT-B/16").vision).eval()
    random_alpha_conv_(core)
    official = {k.replace("attn.in_proj_", "attn.in_proj."): v for k, v in core.state_dict().items()}
    model = timm.create_model(  # every weight is loaded, so the random init is skipped
        "alphaclip_vit_base_patch16_224.grit1m", pretrained=True, pretrained_cfg_overlay=dict(state_dict=official),
        weight_init="skip",
    ).eval()
    rgb, alpha, rgba = _inputs(batch=1, size=224)
    with torch.no_grad():
        assert (model(rgba) - core(rgb, alpha)).abs().max() < TOL
