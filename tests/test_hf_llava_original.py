"""The original LLaVA code base (``llava-torch``, transformers 4.37) with the builder patch docs/llava.md gives.

Runs where ``llava`` is importable: ``scripts/test.sh`` runs it in the transformers-4.37.2 venv of
``scripts/hf_venvs.sh``. A copy of the installed ``llava`` package gets the doc's patch; a tiny
``LlavaLlamaForCausalLM`` built with LLaVA's classes is saved and loaded with LLaVA's ``load_pretrained_model``.
"""
from __future__ import annotations

import importlib.util
import io
import shutil
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

if importlib.util.find_spec("llava") is None:
    pytest.skip("needs the original LLaVA code base: run in `bash scripts/hf_venvs.sh tf-4.37.2`'s venv",
                allow_module_level=True)

import alphaclip_plugins.integrations.hf as ahf  # noqa: E402
from alphaclip_plugins.core.checkpoint import save_official  # noqa: E402
from alphaclip_plugins.core.config import get_config  # noqa: E402
from alphaclip_plugins.core.vision import VisionTransformer  # noqa: E402
from conftest import HF_TINY_VISION, random_alpha_conv_  # noqa: E402
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel  # noqa: E402

TOL = 1e-5
DOC = Path(__file__).resolve().parents[1] / "docs" / "llava.md"
WORDS = "user assistant what is this the region a cat dog on mat red blue green left right top bottom".split()
PROMPT = "USER: <image>\nwhat is this region ? ASSISTANT:"


def _doc_patch() -> list[tuple[str, str]]:
    """docs/llava.md's ```diff block as (old, new) text pairs, one per hunk (hunks are split by `...`)."""
    text = DOC.read_text()
    block = text.split("```diff\n", 1)[1].split("```", 1)[0]
    hunks, old, new = [], [], []
    for line in block.splitlines() + ["..."]:
        if line == "...":
            hunks.append(("\n".join(old) + "\n", "\n".join(new) + "\n"))
            old, new = [], []
            continue
        sign, rest = line[:1], line[1:]
        if sign in " -":
            old.append(rest)
        if sign in " +":
            new.append(rest)
    return hunks


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """LLaVA's package, from a copy with docs/llava.md's patch applied to its builder."""
    root = tmp_path_factory.mktemp("patched")
    shutil.copytree(Path(importlib.util.find_spec("llava").origin).parent, root / "llava")
    builder = root / "llava" / "model" / "multimodal_encoder" / "builder.py"
    source = builder.read_text()
    for old, new in _doc_patch():
        assert source.count(old) == 1, f"docs/llava.md's patch does not apply to LLaVA's builder.py:\n{old}"
        source = source.replace(old, new)
    builder.write_text(source)
    assert not any(m == "llava" or m.startswith("llava.") for m in sys.modules)
    sys.path.insert(0, str(root))
    try:
        import llava.model.builder
        import llava.model.multimodal_encoder.builder as patched

        assert Path(patched.__file__).resolve() == builder.resolve()
        yield llava
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == "llava" or m.startswith("llava.")]:
            del sys.modules[name]


def _tokenizer_file(path: Path) -> None:
    """A tiny SentencePiece model (LLaVA's Llama loads the slow, SentencePiece tokenizer)."""
    import sentencepiece as spm

    model = io.BytesIO()
    sentences = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(model.getvalue())


@pytest.fixture(scope="module")
def saved(llava, tmp_path_factory) -> Dict[str, Path]:
    """A CLIP tower directory, an Alpha-CLIP checkpoint, and two saved LLaVAs: with and without it."""
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM
    from transformers import LlamaTokenizer

    root = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    clip = root / "clip-tiny"
    CLIPVisionModel(CLIPVisionConfig(**HF_TINY_VISION)).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    core = VisionTransformer(get_config("tiny").vision)
    random_alpha_conv_(core)
    save_official(core, root / "alpha.pth")
    _tokenizer_file(root / "tokenizer.model")
    tokenizer = LlamaTokenizer(str(root / "tokenizer.model"))
    out = {"clip": clip, "alpha": root / "alpha.pth"}
    for name, alpha in (("llava-tiny-alpha", str(root / "alpha.pth")), ("llava-tiny-plain", None)):
        config = LlavaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, mm_vision_tower=str(clip),
            mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu",
            mm_hidden_size=HF_TINY_VISION["hidden_size"], mm_use_im_start_end=False, mm_use_im_patch_token=False,
            image_aspect_ratio="pad", **({"mm_alpha_clip_checkpoint": alpha} if alpha else {}),
        )
        torch.manual_seed(1)  # the same language model and projector in both
        model = LlavaLlamaForCausalLM(config)
        assert isinstance(model.get_vision_tower(), ahf.AlphaCLIPVisionTower)  # the patched builder built it
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


def _load(path: Path):
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(str(path), None, path.name, device="cpu", device_map="cpu")


def _inputs(image_processor, regions):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 52, 3), dtype=np.uint8), rng.integers(0, 255, (36, 30, 3), dtype=np.uint8)]
    pixels = image_processor.preprocess(images, regions=regions, return_tensors="pt")["pixel_values"]
    return pixels, images


def _masks():
    a, b = np.zeros((40, 52), bool), np.zeros((36, 30), bool)
    a[4:20, 6:30] = True
    b[18:, 12:] = True
    c = np.zeros((40, 52), bool)
    c[25:, :20] = True
    return a, b, c


def _ids(tokenizer, batch: int) -> torch.Tensor:
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    ids = tokenizer_image_token(PROMPT, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    return ids.unsqueeze(0).repeat(batch, 1)


@torch.no_grad()
def test_load_pretrained_model_builds_the_alpha_tower_with_its_checkpoint(saved):
    tokenizer, model, image_processor, _ = _load(saved["llava-tiny-alpha"])
    tower = model.get_vision_tower()
    assert isinstance(tower, ahf.AlphaCLIPVisionTower) and tower.is_loaded
    assert image_processor is tower.image_processor and isinstance(image_processor, ahf.AlphaCLIPImageProcessor)
    assert model.dtype == tower.dtype == torch.float16  # load_pretrained_model's dtype, tower included
    alpha_conv = ahf.vision_body(tower.vision_tower).embeddings.patch_embedding_alpha.weight
    core = torch.load(saved["alpha"], weights_only=True)
    assert torch.equal(alpha_conv, core["conv1_alpha.weight"].half())  # mm_alpha_clip_checkpoint was loaded


@torch.no_grad()
def test_zero_alpha_conv_gives_stock_clip_vision_tower_logits_exactly(saved):
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    tokenizer, model, image_processor, _ = _load(saved["llava-tiny-plain"])  # fp16, as LLaVA runs it
    a, b, _ = _masks()
    pixels, _ = _inputs(image_processor, [a, b])
    pixels, ids = pixels.half(), _ids(tokenizer, 2)
    alpha = model(input_ids=ids, images=pixels).logits
    stock = CLIPVisionTower(str(saved["clip"]), args=model.config)
    model.get_model().vision_tower = stock.to(torch.float16)  # what load_pretrained_model does to its tower
    ref = model(input_ids=ids, images=pixels[:, :3]).logits  # LLaVA's own tower, RGB only
    assert model.dtype == torch.float16 and torch.equal(alpha, ref)


@torch.no_grad()
def test_regions_batch_whole_image_and_fp16_generate(saved):
    tokenizer, model, image_processor, _ = _load(saved["llava-tiny-alpha"])
    a, b, c = _masks()
    ids = _ids(tokenizer, 2)
    # fp16, as load_pretrained_model returns it: generate a batch of two (image, region) samples.
    pixels, images = _inputs(image_processor, [a, b])
    out = model.generate(ids, images=pixels.half(), max_new_tokens=4, do_sample=False, min_new_tokens=4,
                         output_scores=True, return_dict_in_generate=True)
    # 4 new tokens per sample (min_new_tokens masks EOS with -inf: no NaN is the check)
    assert out.sequences.shape[0] == 2 and len(out.scores) == 4 and not any(s.isnan().any() for s in out.scores)
    assert out.sequences.shape[1] >= 4 and out.sequences.max() < len(tokenizer)
    # fp32 for the comparisons.
    model.float()
    logits = model(input_ids=ids, images=pixels).logits
    for i in range(2):
        single = model(input_ids=ids[i : i + 1], images=pixels[i : i + 1]).logits
        assert (single[0] - logits[i]).abs().max() < TOL  # each sample as if alone
        listed = model(input_ids=ids[i : i + 1], images=[pixels[i]]).logits  # LLaVA's list-of-images input
        assert (listed[0] - logits[i]).abs().max() < TOL
    other, _ = _inputs(image_processor, [c, b])  # image 0 with another region
    moved = model(input_ids=ids, images=other).logits
    assert (moved[0] - logits[0]).abs().max() > 1e-3  # the region changes the answer
    assert (moved[1] - logits[1]).abs().max() < TOL  # and only its own sample's
    whole, _ = _inputs(image_processor, [None, None])
    rgb = model(input_ids=ids, images=whole[:, :3]).logits
    assert (model(input_ids=ids, images=whole).logits - rgb).abs().max() < TOL  # 3 channels = whole image
    assert (rgb - logits).abs().max() > 1e-3
