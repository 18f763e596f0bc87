"""The core model: parity with independent CLIP implementations, alpha semantics, training behaviour."""
from __future__ import annotations

import pytest
import torch

from alphaclip_plugins import create_model, tokenize
from alphaclip_plugins.core.alpha import ALPHA_FOREGROUND, encode_alpha
from alphaclip_plugins.core.checkpoint import load_checkpoint
from conftest import import_or_skip, random_alpha

TOL = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.slow
def test_parity_open_clip_vit_b16_full_size():
    open_clip = import_or_skip("open_clip")
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-16-quickgelu").eval()
    model = create_model("ViT-B/16")
    result = load_checkpoint(model, ref.state_dict())
    assert result.new_alpha and not result.missing and not result.unexpected
    image = torch.randn(2, 3, 224, 224)
    text = tokenize(["a photo of a cat", "a red circle on the left"])
    with torch.no_grad():
        assert _max_diff(model.encode_image(image), ref.encode_image(image)) < TOL
        assert _max_diff(model.encode_image(image, random_alpha(2, 224)), ref.encode_image(image)) < TOL
        assert _max_diff(model.encode_text(text), ref.encode_text(text)) < TOL


def test_parity_open_clip_gelu_tiny():
    import_or_skip("open_clip")
    from open_clip.model import CLIP

    torch.manual_seed(0)
    ref = CLIP(32, dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32, mlp_ratio=4.0),
               dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)).eval()
    model = create_model("tiny-gelu")
    load_checkpoint(model, ref.state_dict())
    image, text = torch.randn(3, 3, 32, 32), tokenize(["a", "b c", "d e f"])
    with torch.no_grad():
        assert _max_diff(model.encode_image(image), ref.encode_image(image)) < TOL
        assert _max_diff(model.encode_text(text), ref.encode_text(text)) < TOL


def test_parity_transformers_clip_model():
    transformers = import_or_skip("transformers")
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=49408, max_position_embeddings=77, eos_token_id=49407),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    ref = CLIPModel(cfg).eval()
    model = create_model("tiny")
    load_checkpoint(model, ref.state_dict())
    image, text = torch.randn(2, 3, 32, 32), tokenize(["a cat", "two dogs"])
    with torch.no_grad():
        ref_img = ref.get_image_features(pixel_values=image)
        ref_txt = ref.get_text_features(input_ids=text)
        ref_img = getattr(ref_img, "pooler_output", ref_img)
        ref_txt = getattr(ref_txt, "pooler_output", ref_txt)
        assert _max_diff(model.encode_image(image), ref_img) < TOL
        assert _max_diff(model.encode_text(text), ref_txt) < TOL
    assert transformers.__version__


def test_parity_timm_clip_vit():
    timm = import_or_skip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, img_size=32, patch_size=8,
                            embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, num_classes=32).eval()
    with torch.no_grad():
        ref.head.bias.zero_()
    model = create_model("tiny")
    load_checkpoint(model.visual, ref.state_dict())
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(model.encode_image(image), ref(image)) < TOL
        assert _max_diff(model.visual.forward_features(image), ref.forward_features(image)) < TOL


def test_zero_alpha_conv_ignores_alpha():
    model = create_model("tiny")  # fresh: conv1_alpha is zero, so Alpha-CLIP equals CLIP
    assert model.visual.conv1_alpha.weight.abs().max() == 0
    image = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        base = model.encode_image(image)
        for seed in range(3):
            assert _max_diff(model.encode_image(image, random_alpha(3, 32, seed)), base) == 0


def test_alpha_changes_embedding_and_rgba_equals_separate(tiny_model):
    image, alpha = torch.randn(2, 3, 32, 32), random_alpha(2, 32)
    with torch.no_grad():
        whole = tiny_model.encode_image(image)
        region = tiny_model.encode_image(image, alpha)
        rgba = tiny_model.encode_image(torch.cat([image, alpha], dim=1))
        explicit_whole = tiny_model.encode_image(image, torch.full((2, 1, 32, 32), ALPHA_FOREGROUND))
    assert _max_diff(region, whole) > 1e-3
    assert _max_diff(rgba, region) == 0
    assert _max_diff(explicit_whole, whole) < 1e-5


def test_one_image_many_alphas_broadcasts(tiny_model):
    image, alpha = torch.randn(1, 3, 32, 32), random_alpha(5, 32)
    with torch.no_grad():
        shared = tiny_model.encode_image(image, alpha)
        repeated = tiny_model.encode_image(image.expand(5, -1, -1, -1), alpha)
    assert shared.shape == (5, 32) and _max_diff(shared, repeated) < 1e-6


@pytest.mark.parametrize(
    "image, alpha, match",
    [
        (torch.randn(1, 5, 32, 32), None, "5 channels"),
        (torch.randn(1, 3, 32, 32), torch.zeros(1, 1, 16, 16), "alpha is"),
        (torch.randn(1, 3, 30, 30), None, "multiple of the patch size"),
        (torch.randn(2, 3, 32, 32), random_alpha(3, 32), "batch"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_model, image, alpha, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.encode_image(image, alpha)


def test_gradient_checkpointing_same_outputs_and_grads(tiny_model):
    image, alpha, text = torch.randn(2, 3, 32, 32), random_alpha(2, 32), tokenize(["a", "b"])

    def run():
        tiny_model.zero_grad()
        img, txt, scale = tiny_model(image, text, alpha)
        (scale * img @ txt.T).logsumexp(-1).sum().backward()
        return img.detach(), {n: p.grad.clone() for n, p in tiny_model.named_parameters()}

    tiny_model.train()
    out_a, grads_a = run()
    tiny_model.set_grad_checkpointing(True)
    out_b, grads_b = run()
    assert _max_diff(out_a, out_b) < 1e-6
    missing = [n for n, g in grads_a.items() if g is None or g.abs().max() == 0]
    assert not missing, f"parameters without gradient: {missing}"
    for n in grads_a:
        assert _max_diff(grads_a[n], grads_b[n]) < 1e-5, n


def test_forward_intermediates_agree_with_features(tiny_model):
    image, alpha = torch.randn(2, 3, 32, 32), random_alpha(2, 32)
    with torch.no_grad():
        feats = tiny_model.visual.forward_features(image, alpha)
        final, inter = tiny_model.visual.forward_intermediates(image, alpha, norm=True)
        nlc = tiny_model.visual.forward_intermediates(image, alpha, indices=[-1], output_fmt="NLC",
                                                      intermediates_only=True, norm=True)
        with_cls = tiny_model.visual.forward_intermediates(image, alpha, indices=1, return_prefix_tokens=True,
                                                           intermediates_only=True)
    assert len(inter) == 2 and inter[-1].shape == (2, 64, 4, 4)
    assert _max_diff(final, feats) == 0
    assert _max_diff(inter[-1].flatten(2).transpose(1, 2), feats[:, 1:]) < 1e-6
    assert _max_diff(nlc[0], feats[:, 1:]) < 1e-6
    assert with_cls[0][1].shape == (2, 1, 64)


def test_positional_embedding_interpolates_to_other_sizes(tiny_model):
    image, alpha = torch.randn(1, 3, 48, 64), encode_alpha(torch.ones(1, 1, 48, 64))
    with torch.no_grad():
        _, inter = tiny_model.visual.forward_intermediates(image, alpha, indices=1)
    assert inter[0].shape == (1, 64, 6, 8)
    assert torch.isfinite(inter[0]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_models_take_fp32_inputs(tiny_model, dtype):
    image, alpha = torch.randn(2, 3, 32, 32), random_alpha(2, 32)
    with torch.no_grad():
        ref = tiny_model.encode_image(image, alpha, normalize=True)
        half = tiny_model.to(dtype).encode_image(image, alpha, normalize=True)
        text = tiny_model.encode_text(tokenize(["a cat"]))
    assert half.dtype == dtype and text.dtype == dtype
    assert _max_diff(half.float(), ref) < 0.05


def test_autocast_bf16_without_casts(tiny_model):
    image, alpha = torch.randn(2, 3, 32, 32), random_alpha(2, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model.encode_image(image, alpha, normalize=True)
    with torch.no_grad():
        ref = tiny_model.encode_image(image, alpha, normalize=True)
    assert torch.isfinite(out).all() and _max_diff(out.float(), ref) < 0.05


def test_architecture_table_builds_every_variant_shapes():
    from alphaclip_plugins.core.config import ARCHITECTURES, get_config

    assert {"ViT-B/16", "ViT-L/14", "ViT-L/14@336", "ViT-B/32", "ViT-H/14", "ViT-g/14", "ViT-bigG/14"} <= set(ARCHITECTURES)
    assert get_config("ViT-L-14-336").vision.image_size == 336
    assert get_config("ViT-H-14-quickgelu").vision.act == "quick_gelu"
    assert get_config("ViT-H-14").vision.act == "gelu"
    with pytest.raises(ValueError, match="unknown architecture"):
        get_config("ViT-Z/3")
