"""BLIP-2 with an Alpha-CLIP tower: region captioning and Q-Former tuning with the tower frozen."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from conftest import import_or_skip  # noqa: E402
import_or_skip("transformers")

import alphaclip_plugins.integrations.hf as ahf  # noqa: E402
from alphaclip_plugins.integrations.hf import compat, vision_body  # noqa: E402
from conftest import HF_TINY_VISION, random_alpha  # noqa: E402
from transformers import (  # noqa: E402
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

TOL = 1e-5
VISION = HF_TINY_VISION
QUERIES, IMAGE_TOKEN = 4, 5


def _alpha_conv(model) -> torch.Tensor:
    return vision_body(model.vision_model).embeddings.patch_embedding_alpha.weight


def _parts():
    text = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
                       eos_token_id=3)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return dict(qformer_config=qformer.to_dict(), text_config=text.to_dict(), num_query_tokens=QUERIES,
                image_token_index=IMAGE_TOKEN)


@pytest.fixture
def blip2():
    torch.manual_seed(0)
    model = ahf.AlphaBlip2ForConditionalGeneration(ahf.AlphaBlip2Config(vision_config=VISION, **_parts())).eval()
    torch.nn.init.normal_(_alpha_conv(model), std=0.2)
    return model


def _ids(batch: int) -> torch.Tensor:
    return torch.tensor([[IMAGE_TOKEN] * QUERIES + [2, 10, 11, 12, 13]] * batch)


def test_qformer_reads_the_tower_width_and_round_trips(blip2, tmp_path):
    assert type(blip2.config.vision_config) is ahf.AlphaCLIPVisionConfig
    key = blip2.qformer.encoder.layer[0].crossattention.attention.key
    assert key.in_features == VISION["hidden_size"] == blip2.config.qformer_config.encoder_hidden_size
    blip2.save_pretrained(tmp_path)
    loaded = compat.AutoImageTextModel.from_pretrained(tmp_path)
    assert type(loaded) is ahf.AlphaBlip2ForConditionalGeneration
    assert torch.equal(_alpha_conv(loaded), _alpha_conv(blip2))


@torch.no_grad()
def test_tower_gives_all_tokens_after_post_layernorm(blip2):
    plain = ahf.AlphaCLIPVisionModel(blip2.config.vision_config).eval()
    plain.load_state_dict(blip2.vision_model.state_dict())
    image, alpha = torch.randn(2, 3, 32, 32), random_alpha(2, 32)
    ref = plain(image, alpha_values=alpha)
    out = blip2.vision_model(torch.cat([image, alpha], dim=1))
    assert out.last_hidden_state.shape == (2, 17, 64)
    assert (out.last_hidden_state - vision_body(plain).post_layernorm(ref.last_hidden_state)).abs().max() < TOL
    assert (out.pooler_output - ref.pooler_output).abs().max() < TOL


@torch.no_grad()
def test_forward_and_generate_with_a_region_per_sample(blip2):
    image, alpha = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1), random_alpha(2, 32)
    out = blip2(pixel_values=image, alpha_values=alpha, input_ids=_ids(2), labels=_ids(2))
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == (2, QUERIES + 5)
    kw = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    rgba = torch.cat([image, alpha], dim=1)
    both = blip2.generate(pixel_values=rgba, **kw)
    assert both.sequences.shape[0] == 2
    swapped = rgba.clone()
    swapped[1, 3] = random_alpha(1, 32, seed=5)[0, 0]
    other = blip2.generate(pixel_values=swapped, **kw)
    first = lambda g, i: torch.stack([s[i] for s in g.scores])  # noqa: E731
    assert (first(both, 0) - first(other, 0)).abs().max() < TOL  # sample 0 ignores sample 1's region
    assert (first(both, 1) - first(other, 1)).abs().max() > 1e-4
    whole = blip2.generate(pixel_values=image, input_ids=_ids(2), max_new_tokens=2)
    # 2 new tokens after the prompt (with its query tokens) or, on 4.37, after a BOS.
    assert whole.shape[0] == 2 and whole.shape[1] - 2 in (QUERIES + 5, 1)


@torch.no_grad()
def test_more_or_fewer_regions_than_prompts_is_an_error(blip2):
    rgba = torch.cat([torch.randn(2, 3, 32, 32), random_alpha(2, 32)], dim=1)
    for prompts in (1, 3):  # with 1, the second region's features would be dropped silently
        with pytest.raises(ValueError, match="2 \\(image, region\\) samples but %d prompts" % prompts):
            blip2.generate(pixel_values=rgba, input_ids=_ids(prompts), max_new_tokens=1)
        with pytest.raises(ValueError, match="one region per prompt"):
            blip2(pixel_values=rgba, input_ids=_ids(prompts))
    with pytest.raises(ValueError, match="one region per prompt"):  # alpha_values give the regions
        blip2.generate(pixel_values=rgba[:1, :3], alpha_values=rgba[:, 3:], input_ids=_ids(1), max_new_tokens=1)


def test_qformer_fine_tuning_lowers_loss_with_tower_frozen(blip2):
    trainable = blip2.freeze_for_qformer_tuning()
    assert trainable and all(n.startswith(("qformer.", "query_tokens", "language_projection.")) for n in trainable)
    frozen = {k: v.clone() for k, v in blip2.state_dict().items() if k.startswith(("vision_model.", "language_model."))}
    torch.manual_seed(1)
    rgba = torch.cat([torch.randn(2, 3, 32, 32), random_alpha(2, 32)], dim=1)
    ids = _ids(2)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    optimizer = torch.optim.AdamW([p for p in blip2.parameters() if p.requires_grad], lr=3e-3)
    blip2.train()
    losses = []
    for _ in range(6):
        loss = blip2(pixel_values=rgba, input_ids=ids, labels=labels).loss
        loss.backward()
        assert _alpha_conv(blip2).grad is None
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(blip2.state_dict()[k], v) for k, v in frozen.items())


def test_from_blip2_takes_qformer_and_language_model(blip2):
    torch.manual_seed(3)
    eva = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, image_size=32,
               patch_size=8)
    source = Blip2ForConditionalGeneration(Blip2Config(vision_config=eva, **_parts())).eval()
    model = ahf.AlphaBlip2ForConditionalGeneration.from_blip2(source, blip2.vision_model)
    assert sorted(model.reinitialized_keys) == sorted(
        f"qformer.encoder.layer.0.crossattention.attention.{p}.weight" for p in ("key", "value"))
    src, own = source.state_dict(), model.state_dict()
    kept = [k for k in own if not k.startswith("vision_model.") and k not in model.reinitialized_keys]
    assert kept and all(torch.equal(own[k], src[k]) for k in kept)
    assert all(torch.equal(v, own["vision_model." + k]) for k, v in blip2.vision_model.state_dict().items())


def test_blip2_processor_with_alpha_image_processor():
    if "BlipImageProcessor" in str(getattr(Blip2Processor, "image_processor_class", None)):
        pytest.skip(f"transformers {compat.transformers.__version__}'s Blip2Processor takes BlipImageProcessor only")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<pad>", "<s>", "</s>", "a", "<image>", "photo", "of"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>")
    queries = {"num_query_tokens": QUERIES} if "num_query_tokens" in inspect.signature(Blip2Processor).parameters else {}
    processor = Blip2Processor(ahf.AlphaCLIPImageProcessor(image_size=32), tokenizer, **queries)
    image = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    out = processor(images=[image, image], text=["a photo of", "a photo"], regions=[(0, 0, 20, 15), (10, 5, 40, 30)],
                    padding=True, return_tensors="pt")
    assert out["pixel_values"].shape == (2, 4, 32, 32)
    assert (out["input_ids"][:, :QUERIES] == IMAGE_TOKEN).all() == bool(queries)  # the processor adds them (4.4x on)
    assert not torch.equal(out["pixel_values"][0, 3], out["pixel_values"][1, 3])
