"""open_clip integration: alphafy, conversion to and from the core, official checkpoints."""
from __future__ import annotations

import copy
import pickle
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")

from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP  # noqa: E402

from alphaclip_plugins.core.alpha import check_alpha_in_forward  # noqa: E402
from alphaclip_plugins.core.config import get_config  # noqa: E402
from alphaclip_plugins.core.convert import to_alphaclip  # noqa: E402
from alphaclip_plugins.core.factory import create_model  # noqa: E402
from alphaclip_plugins.core.io import CheckpointError  # noqa: E402
from alphaclip_plugins.core.model import AlphaCLIP  # noqa: E402
from alphaclip_plugins.integrations.open_clip import (  # noqa: E402
    alphafy, core_config, from_core, load_alpha_checkpoint, open_clip_config, to_core,
)
from conftest import random_alpha, random_alpha_conv_  # noqa: E402

TOL = 1e-5
STANDARD = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-g-14", "ViT-bigG-14"]


def _tiny_open_clip(quick_gelu: bool, seed: int = 0) -> CLIP:
    """open_clip's CLIP at the core's ``tiny`` shapes, with open_clip's own random init."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
    text = CLIPTextCfg(width=32, heads=2, layers=2)
    return CLIP(32, vision, text, quick_gelu=quick_gelu).eval()


def _core_copy(model: nn.Module, arch: str) -> AlphaCLIP:
    """The core model of ``arch`` holding ``model``'s weights through the core's converter (not ``to_core``)."""
    with torch.device("meta"):  # no init: every weight is assigned
        core = AlphaCLIP(get_config(arch))
    core.load_state_dict(to_alphaclip(model.state_dict()), strict=True, assign=True)
    return core.eval()


def _batch(size: int = 32, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 49000, (batch, 77), generator=g)
    text[:, 9] = 49407  # end-of-text, the largest id: where CLIP pools
    return torch.randn(batch, 3, size, size, generator=g), random_alpha(batch, size), text


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("quick_gelu, arch", [(True, "tiny"), (False, "tiny-gelu")])
def test_alphafied_model_matches_core(quick_gelu, arch):
    model = alphafy(_tiny_open_clip(quick_gelu))
    random_alpha_conv_(model)
    core = _core_copy(model, arch)
    image, alpha, text = _batch()
    with torch.no_grad():
        assert _max_diff(model.encode_image(image, alpha), core.encode_image(image, alpha)) < TOL
        assert _max_diff(model.encode_image(image), core.encode_image(image)) < TOL
        assert _max_diff(model.encode_text(text), core.encode_text(text)) < TOL
        img, txt, scale = model(image, text, alpha=alpha)
        ref = core(image, text, alpha)
    assert _max_diff(img, ref[0]) < TOL and _max_diff(txt, ref[1]) < TOL and _max_diff(scale, ref[2]) < TOL


def test_alphafy_keeps_clip_until_alpha_is_trained():
    model = _tiny_open_clip(quick_gelu=True)
    image, alpha, _ = _batch()
    with torch.no_grad():
        before = model.encode_image(image)
        alphafy(model)
        assert torch.equal(model.encode_image(image), before)
        assert torch.equal(model.encode_image(image, alpha), before)  # zero alpha conv: alpha has no effect
        random_alpha_conv_(model)
        assert _max_diff(model.encode_image(image, alpha), before) > 1e-3
    assert "visual.conv1_alpha.weight" in model.state_dict() and isinstance(model, CLIP)
    assert alphafy(model) is model  # twice is harmless


def test_alpha_as_fourth_channel_and_shared_image():
    model = alphafy(_tiny_open_clip(quick_gelu=True))
    random_alpha_conv_(model)
    image, alpha, _ = _batch()
    with torch.no_grad():
        ref = model.encode_image(image, alpha)
        assert torch.equal(model.encode_image(torch.cat([image, alpha], dim=1)), ref)
        one_image = model.encode_image(image[:1], alpha)  # one image, many regions
        assert _max_diff(one_image[0], ref[0]) < TOL and one_image.shape == ref.shape
    with pytest.raises(TypeError, match="normalize by keyword"):
        model.encode_image(image, True)
    previous = check_alpha_in_forward(True)  # forwards check values only when asked to
    try:
        with pytest.raises(ValueError, match="encode_alpha"):
            model.encode_image(image, (alpha > 0).float())  # a raw [0, 1] mask, not encoded alpha
    finally:
        check_alpha_in_forward(previous)


def test_threads_do_not_share_alpha():
    model = alphafy(_tiny_open_clip(quick_gelu=True))
    random_alpha_conv_(model)
    image, _, _ = _batch()
    alphas = [random_alpha(2, 32, seed=s) for s in range(4)]
    with torch.no_grad():
        expected = [model.encode_image(image, a) for a in alphas]
    results = [None] * len(alphas)

    def run(i: int) -> None:
        with torch.no_grad():
            for _ in range(3):
                results[i] = model.encode_image(image, alphas[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(alphas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_round_trips_are_bit_exact(quick_gelu):
    model = alphafy(_tiny_open_clip(quick_gelu))
    random_alpha_conv_(model)
    back = from_core(to_core(model))
    assert type(back) is type(model)
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    core = create_model("tiny" if quick_gelu else "tiny-gelu")
    random_alpha_conv_(core)
    again = to_core(from_core(core))
    assert (again.cfg.vision, again.cfg.text) == (core.cfg.vision, core.cfg.text)
    sa, sb = core.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_custom_text_clip_converts():
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
    model = alphafy(CustomTextCLIP(32, vision, CLIPTextCfg(width=32, heads=2, layers=2), quick_gelu=True).eval())
    random_alpha_conv_(model)
    core = to_core(model).eval()
    image, alpha, text = _batch()
    with torch.no_grad():
        assert _max_diff(model.encode_image(image, alpha), core.encode_image(image, alpha)) < TOL
        assert _max_diff(model.encode_text(text), core.encode_text(text)) < TOL
        logits, _ = model.get_logits(image, text, alpha=alpha)
        out = model.forward_intermediates(image, alpha=alpha, image_indices=1, intermediates_only=True)
        ref = core.visual.forward_intermediates(image, alpha, indices=1, intermediates_only=True)
    assert logits.shape == (2, 2) and _max_diff(out["image_intermediates"][0], ref[0]) < TOL


def test_to_core_of_a_plain_clip_has_zero_alpha():
    core = to_core(_tiny_open_clip(quick_gelu=True))
    assert not core.visual.conv1_alpha.weight.any()


@pytest.mark.parametrize("name", STANDARD + [n + "-quickgelu" for n in STANDARD])
def test_standard_configs_convert_both_ways(name):
    quick_gelu = name.endswith("-quickgelu")
    ref = get_config(name)
    if not quick_gelu:  # open_clip's plain names are its GELU (LAION) models
        ref = ref.replace(vision_act="gelu", text_act="gelu")
    # open_clip ships no -quickgelu config for g and bigG: its quick_gelu flag makes one.
    cfg = dict(open_clip.get_model_config(name.replace("-quickgelu", "")), quick_gelu=quick_gelu)
    with torch.device("meta"):  # shapes only: no memory, no init time
        theirs = alphafy(CLIP(**cfg))
        ours = CLIP(**open_clip_config(ref))
    assert core_config(theirs).vision == ref.vision and core_config(theirs).text == ref.text
    shapes = {k: v.shape for k, v in theirs.state_dict().items() if "conv1_alpha" not in k}
    assert shapes == {k: v.shape for k, v in ours.state_dict().items()}
    assert type(ours.visual.transformer.resblocks[0].mlp.gelu) is type(theirs.visual.transformer.resblocks[0].mlp.gelu)


def _official_file(model: AlphaCLIP, path: Path) -> Path:
    """An official release file: vision tower only, no prefix, ``attn.in_proj.weight`` (an nn.Linear)."""
    sd = {k.replace("attn.in_proj_", "attn.in_proj."): v.clone() for k, v in model.visual.state_dict().items()}
    torch.save(sd, path)
    return path


def test_official_checkpoint_loads(tiny_model, tmp_path):
    model = _tiny_open_clip(quick_gelu=True)
    text_before = copy.deepcopy(model.transformer.state_dict())
    result = load_alpha_checkpoint(model, _official_file(tiny_model, tmp_path / "clip_tiny_grit1m.pth"))
    assert result.format == "official"
    image, alpha, _ = _batch()
    with torch.no_grad():
        assert _max_diff(model.encode_image(image, alpha), tiny_model.encode_image(image, alpha)) < TOL
    assert all(torch.equal(v, text_before[k]) for k, v in model.transformer.state_dict().items())


def test_official_checkpoint_checks_architecture_and_activation(tiny_model, tmp_path):
    path = _official_file(tiny_model, tmp_path / "clip_tiny_grit1m.pth")
    with pytest.warns(UserWarning, match="QuickGELU"):
        load_alpha_checkpoint(_tiny_open_clip(quick_gelu=False), path)
    wide = create_model("tiny", vision_width=128)
    with pytest.raises(CheckpointError, match="vision_width"):
        load_alpha_checkpoint(_tiny_open_clip(quick_gelu=True), _official_file(wide, tmp_path / "wide.pth"))


def test_copies_and_pickles_keep_alpha():
    model = alphafy(_tiny_open_clip(quick_gelu=True))
    random_alpha_conv_(model)
    image, alpha, _ = _batch()
    with torch.no_grad():
        ref = model.encode_image(image, alpha)
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert other.visual.conv1.forward.args[0] is other.visual  # bound to its own tower
            assert torch.equal(other.encode_image(image, alpha), ref)


def test_unsupported_models_are_refused():
    with pytest.raises(TypeError, match="open_clip CLIP"):
        alphafy(nn.Linear(2, 2))
    resnet = CLIP(32, CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, head_width=8, image_size=32), CLIPTextCfg(
        width=32, heads=2, layers=1))
    with pytest.raises(TypeError, match="VisionTransformer"):
        alphafy(resnet)


@pytest.mark.slow
def test_full_size_b16_quickgelu_matches_core():
    torch.manual_seed(0)
    model = alphafy(open_clip.create_model("ViT-B-16-quickgelu").eval())
    random_alpha_conv_(model)
    core = _core_copy(model, "ViT-B-16-quickgelu")
    image, alpha, _ = _batch(size=224, batch=1)
    with torch.no_grad():
        assert _max_diff(model.encode_image(image, alpha), core.encode_image(image, alpha)) < TOL
