"""Hugging Face Alpha-CLIP: parity with the core and with stock CLIP, loading, processor, export."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import import_or_skip  # noqa: E402
import_or_skip("transformers")

import alphaclip_plugins.integrations.hf as ahf  # noqa: E402
from alphaclip_plugins import create_model, tokenize  # noqa: E402
from alphaclip_plugins.core.alpha import ALPHA_FOREGROUND, check_alpha_in_forward, encode_alpha  # noqa: E402
from alphaclip_plugins.core.checkpoint import save_official  # noqa: E402
from alphaclip_plugins.core.config import get_config  # noqa: E402
from alphaclip_plugins.core.convert import from_alphaclip  # noqa: E402
from alphaclip_plugins.core.processor import RegionProcessor  # noqa: E402
from alphaclip_plugins.core.vision import VisionTransformer  # noqa: E402
from alphaclip_plugins.integrations.hf import compat, vision_body  # noqa: E402
from conftest import HF_TINY_VISION, random_alpha, random_alpha_conv_  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)

TOL = 1e-5
# The core "tiny" tower as a transformers config.
TINY = HF_TINY_VISION
TINY_TEXT = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
                 bos_token_id=97, eos_token_id=98, pad_token_id=0)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _features(out) -> torch.Tensor:
    """``get_*_features``' result: a tensor before v5, an output whose ``pooler_output`` it is from v5."""
    return getattr(out, "pooler_output", out)


#: Where a bare tower's keys start: flat from v5, under `vision_model.` before.
TOWER_PREFIX = "" if compat.V5 else "vision_model."


def _hf_from_core(core: VisionTransformer) -> ahf.AlphaCLIPVisionModelWithProjection:
    model = ahf.AlphaCLIPVisionModelWithProjection(ahf.AlphaCLIPVisionConfig(**TINY)).eval()
    model.load_state_dict(from_alphaclip({"visual." + k: v for k, v in core.state_dict().items()}, "hf"), strict=True)
    return model


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    core = VisionTransformer(get_config("tiny").vision).eval()
    random_alpha_conv_(core)
    return core, _hf_from_core(core)


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory):
    """A stock CLIPVisionModel directory and the model itself."""
    torch.manual_seed(1)
    stock = CLIPVisionModel(CLIPVisionConfig(**TINY)).eval()
    path = tmp_path_factory.mktemp("stock")
    stock.save_pretrained(path)
    return path, stock


@torch.no_grad()
def test_parity_with_core_four_channels_and_alpha_values(towers):
    core, hf = towers
    image, alpha = torch.randn(3, 3, 32, 32), random_alpha(3, 32)
    ref = core(image, alpha)
    assert _diff(ref, core(image)) > 1e-2  # the region changes the embedding
    rgba = hf(torch.cat([image, alpha], dim=1), output_hidden_states=True)
    split = hf(image, alpha_values=alpha, output_hidden_states=True)
    assert _diff(rgba.image_embeds, ref) < TOL
    assert _diff(split.image_embeds, ref) < TOL
    assert _diff(hf(image).image_embeds, core(image)) < TOL  # 3 channels = whole image
    # Per-block tokens: hidden_states[-2] is the input of the last block, LLaVA's feature layer.
    (patches, cls), = core.forward_intermediates(image, alpha, indices=[-2], output_fmt="NLC",
                                                   return_prefix_tokens=True, intermediates_only=True)
    assert _diff(rgba.hidden_states[-2], torch.cat([cls, patches], dim=1)) < TOL
    tokens = hf.vision_model.post_layernorm(rgba.last_hidden_state)
    assert _diff(tokens, core.forward_features(image, alpha)) < TOL


@torch.no_grad()
def test_whole_image_means_foreground_alpha_not_zeros(towers):
    _, hf = towers
    image = torch.randn(2, 3, 32, 32)
    whole = hf(image).image_embeds
    assert _diff(hf(image, alpha_values=torch.full((2, 1, 32, 32), ALPHA_FOREGROUND)).image_embeds, whole) < TOL
    previous = check_alpha_in_forward(True)  # forwards check values only when asked to
    try:
        with pytest.raises(ValueError, match="all zeros"):
            hf(image, alpha_values=torch.zeros(2, 1, 32, 32))
        with pytest.raises(ValueError, match="raw \\[0, 1\\] mask"):
            hf(image, alpha_values=(torch.rand(2, 1, 32, 32) > 0.5).float())
    finally:
        check_alpha_in_forward(previous)
    with pytest.raises(ValueError, match="RGBA"):
        hf(torch.randn(2, 4, 32, 32), alpha_values=random_alpha(2, 32))


@torch.no_grad()
def test_batch_is_per_sample_and_one_image_many_regions(towers):
    _, hf = towers
    image, alpha = torch.randn(1, 3, 32, 32), random_alpha(3, 32)
    shared = hf(image, alpha_values=alpha).image_embeds  # one image, three regions
    for i in range(3):
        alone = hf(image, alpha_values=alpha[i : i + 1]).image_embeds
        assert _diff(shared[i : i + 1], alone) < TOL
    # Other resolutions: alpha goes through the same patch grid as the image.
    image, alpha = torch.randn(2, 3, 48, 48), random_alpha(2, 48)
    if not compat.CLIP_INTERPOLATES:
        with pytest.raises(ahf.TransformersVersionError, match="needs transformers>=4.46"):
            hf(image, alpha_values=alpha, interpolate_pos_encoding=True)
        return
    big = hf(image, alpha_values=alpha, interpolate_pos_encoding=True)
    assert big.last_hidden_state.shape == (2, 1 + 6 * 6, 64)


@torch.no_grad()
def test_stock_clip_directory_loads_with_only_alpha_new(stock_dir, tmp_path):
    path, stock = stock_dir
    model, info = ahf.AlphaCLIPVisionModel.from_pretrained(path, output_loading_info=True)
    assert set(info["missing_keys"]) == {TOWER_PREFIX + "embeddings.patch_embedding_alpha.weight"}
    assert not info["unexpected_keys"]
    assert vision_body(model).embeddings.patch_embedding_alpha.weight.abs().max() == 0
    # Loaded the way LLaVA's builder loads its tower (device_map: accelerate's low-memory path), too.
    mapped = ahf.AlphaCLIPVisionModel.from_pretrained(path, device_map="cpu")
    assert vision_body(mapped).embeddings.patch_embedding_alpha.weight.abs().max() == 0
    image, alpha = torch.randn(2, 3, 32, 32), random_alpha(2, 32)
    ref = stock(image, output_hidden_states=True)
    out = model(torch.cat([image, alpha], dim=1), output_hidden_states=True)  # zero conv: alpha has no effect
    assert _diff(out.pooler_output, ref.pooler_output) < TOL
    assert all(_diff(a, b) < TOL for a, b in zip(out.hidden_states, ref.hidden_states))
    if not compat.V5:
        return  # the rest is v5 reading a tower written by 4.x, where `vision_model.` is the native layout
    # Checkpoints written before transformers v5 prefix the tower's keys with `vision_model.`.
    from safetensors.torch import load_file, save_file

    legacy = tmp_path / "legacy"
    stock.config.save_pretrained(legacy)
    sd = load_file(str(path / "model.safetensors"))
    save_file({"vision_model." + k: v for k, v in sd.items()}, str(legacy / "model.safetensors"), {"format": "pt"})
    model, info = ahf.AlphaCLIPVisionModel.from_pretrained(legacy, output_loading_info=True)
    assert info["missing_keys"] == {"embeddings.patch_embedding_alpha.weight"} and not info["unexpected_keys"]
    assert _diff(model(image).pooler_output, ref.pooler_output) < TOL


@torch.no_grad()
def test_stock_clip_model_loads_into_two_tower_model(tmp_path):
    torch.manual_seed(2)
    stock = CLIPModel(CLIPConfig(vision_config=TINY, text_config=TINY_TEXT, projection_dim=32)).eval()
    stock.save_pretrained(tmp_path)
    model, info = ahf.AlphaCLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"vision_model.embeddings.patch_embedding_alpha.weight"}
    assert not info["unexpected_keys"]
    ids, image = torch.randint(1, 97, (2, 6)), torch.randn(3, 3, 32, 32)
    ids[:, -1] = 98
    ref = stock(input_ids=ids, pixel_values=image).logits_per_image
    assert _diff(model(input_ids=ids, pixel_values=image).logits_per_image, ref) < TOL
    assert _diff(model(input_ids=ids, pixel_values=image, alpha_values=random_alpha(3, 32)).logits_per_image, ref) < TOL
    # A whole CLIP's directory as a vision tower (LLaVA's mm_vision_tower, e.g. openai/clip-vit-large-patch14-336).
    config = ahf.AlphaCLIPVisionConfig.from_pretrained(tmp_path)
    assert (config.hidden_size, config.intermediate_size) == (TINY["hidden_size"], TINY["intermediate_size"])
    tower = ahf.AlphaCLIPVisionModel.from_pretrained(tmp_path)
    assert _diff(tower(image).pooler_output, stock.vision_model(image).pooler_output) < TOL


@torch.no_grad()
def test_save_pretrained_round_trip_through_auto_classes(towers, tmp_path):
    _, hf = towers
    tower = ahf.AlphaCLIPVisionModel(hf.config).eval()
    vision_body(tower).load_state_dict(vision_body(hf).state_dict())
    tower.save_pretrained(tmp_path / "tower")
    loaded, info = AutoModel.from_pretrained(tmp_path / "tower", output_loading_info=True)
    assert type(loaded) is ahf.AlphaCLIPVisionModel and not any(info[k] for k in ("missing_keys", "unexpected_keys"))
    image, alpha = torch.randn(2, 3, 32, 32), random_alpha(2, 32)
    ref = tower(image, alpha_values=alpha).pooler_output
    assert _diff(loaded(image, alpha_values=alpha).pooler_output, ref) == 0
    two = ahf.AlphaCLIPModel(ahf.AlphaCLIPConfig(vision_config=TINY, text_config=TINY_TEXT, projection_dim=32))
    assert two.vision_model.embeddings.patch_embedding_alpha.weight.abs().max() == 0  # a fresh model is CLIP
    assert two.vision_model.embeddings.patch_embedding.weight.abs().max() > 0
    two.save_pretrained(tmp_path / "two")
    assert type(AutoModelForZeroShotImageClassification.from_pretrained(tmp_path / "two")) is ahf.AlphaCLIPModel


def test_attention_backends_checkpointing_and_bf16_behave_as_clip(stock_dir):
    path, stock = stock_dir
    torch.manual_seed(3)
    model = ahf.AlphaCLIPVisionModel.from_pretrained(path)
    alpha_conv = vision_body(model).embeddings.patch_embedding_alpha.weight
    torch.nn.init.normal_(alpha_conv, std=0.05)
    image, alpha = torch.randn(2, 3, 32, 32), random_alpha(2, 32)
    with torch.no_grad():
        default = model(image, alpha_values=alpha).last_hidden_state
        if hasattr(model, "set_attn_implementation"):  # before, CLIP's attention is eager only
            model.set_attn_implementation("eager")
        eager = model(image, alpha_values=alpha, output_attentions=True)
    assert _diff(eager.last_hidden_state, default) < TOL and len(eager.attentions) == 2
    model.train()
    plain = model(image, alpha_values=alpha).last_hidden_state
    (grad_plain,) = torch.autograd.grad(plain.square().sum(), alpha_conv)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = model(image, alpha_values=alpha).last_hidden_state
    (grad_ckpt,) = torch.autograd.grad(ckpt.square().sum(), alpha_conv)
    assert _diff(ckpt, plain) < TOL and grad_plain.abs().sum() > 0 and _diff(grad_ckpt, grad_plain) < 1e-4
    # bf16 with fp32 inputs: a zero alpha conv gives exactly stock CLIP's bf16 output.
    half = ahf.AlphaCLIPVisionModel.from_pretrained(path, **compat.dtype_kwarg(torch.bfloat16)).eval()
    with torch.no_grad():
        out = half(torch.cat([image, alpha], dim=1)).last_hidden_state
        assert out.dtype == torch.bfloat16
        assert _diff(out, stock.to(torch.bfloat16)(image).last_hidden_state) == 0
    stock.float()


def test_image_processor_matches_core_processor_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 56, 3), dtype=np.uint8), rng.integers(0, 255, (48, 30, 3), dtype=np.uint8)]
    mask = np.zeros((40, 56), bool)
    mask[5:25, 10:40] = True
    regions = [[mask, (2, 3, 20, 30)], [None]]
    processor = ahf.AlphaCLIPImageProcessor(image_size=32, mode="crop")
    out = processor(images, regions=regions, return_tensors="pt", return_image_index=True)
    ref = RegionProcessor(32, "crop")(images, regions)
    assert out["pixel_values"].shape == (3, 4, 32, 32)
    assert torch.equal(out["pixel_values"], ref.rgba()) and torch.equal(out["image_index"], torch.tensor([0, 0, 1]))
    assert torch.all(out["pixel_values"][2, 3] == ALPHA_FOREGROUND)  # no region = whole image
    assert torch.allclose(out["pixel_values"][0, 3].max(), torch.tensor(ALPHA_FOREGROUND))
    assert torch.allclose(out["pixel_values"][0, 3].min(), encode_alpha(torch.tensor(0.0)))
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is ahf.AlphaCLIPImageProcessor and (loaded.image_size, loaded.mode) == (32, "crop")
    assert torch.equal(loaded(images, regions=regions, return_tensors="pt")["pixel_values"], ref.rgba())
    with pytest.raises(ValueError, match="does not take"):
        processor(images[0], do_resize=True)
    with pytest.raises(ValueError, match="mode"):
        ahf.AlphaCLIPImageProcessor(mode="letterbox")


@torch.no_grad()
def test_export_hf_two_towers_and_official_vision_file(tmp_path):
    core = create_model("tiny")
    random_alpha_conv_(core)
    ahf.export_hf(core, tmp_path / "full")
    model = AutoModel.from_pretrained(tmp_path / "full")
    assert type(model) is ahf.AlphaCLIPModel
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "full")) is ahf.AlphaCLIPImageProcessor
    image, alpha, text = torch.randn(2, 3, 32, 32), random_alpha(2, 32), tokenize(["a cat", "a dog on a mat"])
    features = _features(model.get_image_features(image, alpha_values=alpha))
    assert _diff(features, core.encode_image(image, alpha)) < TOL
    assert _diff(_features(model.get_text_features(text)), core.encode_text(text)) < TOL
    out = model(input_ids=text, pixel_values=torch.cat([image, alpha], dim=1))
    assert _diff(out.image_embeds, core.encode_image(image, alpha, normalize=True)) < TOL
    save_official(core.visual, tmp_path / "alpha.pth")  # the released format: a vision tower only
    vision = ahf.export_hf(tmp_path / "alpha.pth", tmp_path / "vision")
    loaded = ahf.AlphaCLIPVisionModelWithProjection.from_pretrained(tmp_path / "vision")
    assert type(vision) is ahf.AlphaCLIPVisionModelWithProjection
    assert _diff(loaded(image, alpha_values=alpha).image_embeds, core.encode_image(image, alpha)) < TOL


@pytest.mark.slow
@torch.no_grad()
def test_parity_full_size_vit_b16():
    torch.manual_seed(0)
    core = VisionTransformer(get_config("ViT-B/16").vision).eval()
    random_alpha_conv_(core)
    config = ahf.AlphaCLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, image_size=224, patch_size=16, projection_dim=512)
    hf = ahf.AlphaCLIPVisionModelWithProjection(config).eval()
    hf.load_state_dict(from_alphaclip({"visual." + k: v for k, v in core.state_dict().items()}, "hf"), strict=True)
    image, alpha = torch.randn(1, 3, 224, 224), random_alpha(1, 224)
    ref = core(image, alpha)
    assert _diff(hf(torch.cat([image, alpha], dim=1)).image_embeds, ref) < TOL
    assert _diff(hf(image, alpha_values=alpha).image_embeds, ref) < TOL
