"""LLaVA with an Alpha-CLIP tower: transformers' LlavaForConditionalGeneration and the original code base's tower."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import import_or_skip  # noqa: E402
import_or_skip("transformers")

import alphaclip_plugins.integrations.hf as ahf  # noqa: E402
from alphaclip_plugins.core.checkpoint import save_official  # noqa: E402
from alphaclip_plugins.core.config import get_config  # noqa: E402
from alphaclip_plugins.core.vision import VisionTransformer  # noqa: E402
from alphaclip_plugins.integrations.hf import compat, vision_body  # noqa: E402
from alphaclip_plugins.integrations.hf.llava import _llava_core  # noqa: E402
from conftest import HF_TINY_VISION, random_alpha, random_alpha_conv_  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

TOL = 1e-5
VISION = HF_TINY_VISION
WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "what", "is", "this", "?"] + [
    f"w{i}" for i in range(40)
]
IMAGE_TOKEN = 4
PROMPT = "USER: <image> what is this ? ASSISTANT:"
#: <image> tokens per image in input_ids: (32 / 8)^2 patches without CLS where the processor expands them
#: (transformers 4.45 on), one before (the model expands it).
IMAGE_TOKENS = 16 if compat.LLAVA_PROCESSOR_EXPANDS else 1


def _alpha_conv(model) -> torch.Tensor:
    return vision_body(_llava_core(model).vision_tower).embeddings.patch_embedding_alpha.weight


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer built here: nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.add_tokens(["<image>"], special_tokens=True)  # so that "<image><image>..." splits
    return fast


def _config(vision_config) -> LlavaConfig:
    text = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, pad_token_id=1, bos_token_id=2,
                       eos_token_id=3)
    return LlavaConfig(vision_config=vision_config, text_config=text, image_token_index=IMAGE_TOKEN,
                       image_seq_length=16)


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(_config(ahf.AlphaCLIPVisionConfig(**VISION))).eval()
    assert _alpha_conv(model).abs().max() == 0  # starts as CLIP
    torch.nn.init.normal_(_alpha_conv(model), std=0.2)
    return model


def _images_and_masks():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 52, 3), dtype=np.uint8) for _ in range(2)]
    masks = [np.zeros((40, 52), bool) for _ in range(3)]
    masks[0][4:20, 6:30] = True
    masks[1][20:, 26:] = True
    masks[2][:12, :12] = True
    return images, masks


def test_config_with_alpha_vision_builds_and_round_trips(llava, tmp_path):
    assert type(_llava_core(llava).vision_tower) is ahf.AlphaCLIPVisionModel
    llava.save_pretrained(tmp_path)
    loaded = compat.AutoImageTextModel.from_pretrained(tmp_path)
    assert type(_llava_core(loaded).vision_tower) is ahf.AlphaCLIPVisionModel
    assert torch.equal(_alpha_conv(loaded), _alpha_conv(llava))


@torch.no_grad()
def test_alphafy_llava_keeps_weights_and_loads_alpha_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(_config(CLIPVisionConfig(**VISION))).eval()
    _llava_core(model).vision_tower.requires_grad_(False)
    ids = torch.tensor([[2, 5] + [IMAGE_TOKEN] * IMAGE_TOKENS + [7, 8, 9, 10, 6]])
    pixels = torch.randn(1, 3, 32, 32)
    mask = torch.ones_like(ids)  # 4.37's LLaVA needs one
    before = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    n_params = sum(p.numel() for p in model.parameters())
    ahf.alphafy_llava(model)
    tower = _llava_core(model).vision_tower
    assert type(tower) is ahf.AlphaCLIPVisionModel and type(model.config.vision_config) is ahf.AlphaCLIPVisionConfig
    assert not any(p.requires_grad for n, p in tower.named_parameters() if "alpha" not in n)
    added = _alpha_conv(model).numel()
    assert sum(p.numel() for p in model.parameters()) == n_params + added  # the tower was reused, not copied
    assert _max(model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits - before) == 0
    rgba = torch.cat([pixels, random_alpha(1, 32)], dim=1)
    assert _max(model(input_ids=ids, pixel_values=rgba, attention_mask=mask).logits - before) < TOL  # zero alpha conv
    core = VisionTransformer(get_config("tiny").vision)
    random_alpha_conv_(core)
    save_official(core, tmp_path / "alpha.pth")
    ahf.alphafy_llava(model, alpha_checkpoint=tmp_path / "alpha.pth")
    assert torch.equal(_alpha_conv(model), core.conv1_alpha.weight)
    assert torch.equal(vision_body(tower).encoder.layers[1].mlp.fc2.weight, core.transformer.resblocks[1].mlp.c_proj.weight)
    assert _max(model(input_ids=ids, pixel_values=rgba, attention_mask=mask).logits - before) > 1e-3


def _max(t: torch.Tensor) -> float:
    return t.abs().max().item()


def test_processor_builds_prompts_and_rgba_pixels(llava, tokenizer, tmp_path):
    processor = ahf.AlphaLlavaProcessor.from_model(llava, tokenizer)
    images, masks = _images_and_masks()
    inputs = processor(images=images, text=[PROMPT] * 2, regions=masks[:2], return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 4, 32, 32)
    assert (inputs["input_ids"] == IMAGE_TOKEN).sum(dim=1).tolist() == [IMAGE_TOKENS] * 2
    ref = ahf.AlphaCLIPImageProcessor(image_size=32)(images, regions=masks[:2])["pixel_values"]
    assert torch.equal(inputs["pixel_values"], ref)
    with pytest.raises(ValueError, match="one region per image"):
        processor(images=images, text=[PROMPT] * 2, regions=[[masks[0], masks[2]], masks[1]])
    llava.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    for loaded in (ahf.AlphaLlavaProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is ahf.AlphaLlavaProcessor
        assert type(loaded.image_processor) is ahf.AlphaCLIPImageProcessor and loaded.image_processor.image_size == 32
        again = loaded(images=images, text=[PROMPT] * 2, regions=masks[:2], return_tensors="pt")
        assert all(torch.equal(again[k], inputs[k]) for k in inputs)


def test_forward_with_labels_and_generate_per_sample_regions(llava, tokenizer):
    processor = ahf.AlphaLlavaProcessor.from_model(llava, tokenizer)
    images, masks = _images_and_masks()
    inputs = processor(images=images, text=[PROMPT] * 2, regions=masks[:2], return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN, -100)
    out = llava(**inputs, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert _alpha_conv(llava).grad.abs().sum() > 0
    llava.zero_grad()
    other = processor(images=images, text=[PROMPT] * 2, regions=[masks[0], masks[2]], return_tensors="pt")
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        first = llava.generate(**inputs, **kw)
        second = llava.generate(**other, **kw)
        alone = llava.generate(**{k: v[:1] for k, v in inputs.items()}, **kw)
    scores = lambda g, i: torch.stack([s[i] for s in g.scores])  # noqa: E731
    assert first.sequences.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert _max(scores(first, 0) - scores(second, 0)) < TOL  # sample 0 ignores sample 1's region
    assert _max(scores(first, 0) - scores(alone, 0)) < 1e-4  # and equals sample 0 run alone
    assert _max(scores(first, 1) - scores(second, 1)) > 1e-3  # sample 1's own region matters


def test_original_llava_vision_tower(tmp_path):
    torch.manual_seed(2)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(tmp_path / "clip")
    core = VisionTransformer(get_config("tiny").vision)
    random_alpha_conv_(core)
    save_official(core, tmp_path / "alpha.pth")
    args = SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    tower = ahf.AlphaCLIPVisionTower(str(tmp_path / "clip"), args=args, alpha_checkpoint=tmp_path / "alpha.pth")
    assert "llava" not in sys.modules
    assert (tower.hidden_size, tower.num_patches_per_side, tower.num_patches) == (64, 4, 16)
    assert tower.dummy_feature.shape == (1, 64) and tower.dtype == torch.float32
    images, masks = _images_and_masks()
    rgba = tower.image_processor.preprocess(images, regions=masks[:2], return_tensors="pt")["pixel_values"]
    assert rgba.shape == (2, 4, 32, 32)
    batch = tower(rgba)
    listed = tower([rgba[0], rgba[1]])
    assert batch.shape == (2, 16, 64) and not batch.requires_grad
    assert _max(listed[1][0] - batch[1]) < TOL and listed[0].shape == (1, 16, 64)
    with torch.no_grad():
        ref = ahf.AlphaCLIPVisionModel.from_pretrained(tmp_path / "clip")
        ahf.load_alpha_weights(ref, tmp_path / "alpha.pth")
        expected = ref(rgba, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert _max(batch - expected) < TOL
    lazy = ahf.AlphaCLIPVisionTower(str(tmp_path / "clip"), args=SimpleNamespace(
        mm_vision_select_layer=-1, mm_vision_select_feature="cls_patch"), delay_load=True)
    assert not lazy.is_loaded and lazy.num_patches == 16
    lazy.load_model()
    assert lazy(rgba).shape == (2, 17, 64)
