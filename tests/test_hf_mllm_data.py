"""Region conversations collated for transformers' LLaVA with an Alpha-CLIP tower: prompts (chat template or
llava_v1), labels on the assistant's tokens only, 4-channel pixels through the package's geometry, padding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import import_or_skip  # noqa: E402
import_or_skip("transformers")

import alphaclip_plugins.integrations.hf as ahf  # noqa: E402
from alphaclip_plugins.core.alpha import ALPHA_FOREGROUND  # noqa: E402
from alphaclip_plugins.integrations.hf import compat  # noqa: E402
from alphaclip_plugins.integrations.hf.llava import _llava_core  # noqa: E402
from alphaclip_plugins.integrations.hf.mllm_collator import IGNORE_INDEX, PAD_WITH_EOS, model_inputs  # noqa: E402
from alphaclip_plugins.train.loader import DataHealth  # noqa: E402
from alphaclip_plugins.train.mllm_data import BadSample, ConversationDataset, ConversationSample  # noqa: E402
from conftest import HF_TINY_VISION  # noqa: E402
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "user:", "assistant:", "what", "is",
         "this", "?", "and", "there", "a", "red", "blue", "circle", "square", "small", "big", "on", "the", "left",
         "right"] + [f"w{i}" for i in range(20)]
IMAGE_TOKEN, EOS = 4, 3
PAD = EOS if PAD_WITH_EOS else 1  # the id the collator pads with (4.37's LLaVA needs a non-zero pad embedding)
IMAGE_TOKENS = 16 if compat.LLAVA_PROCESSOR_EXPANDS else 1  # (32 / 8)^2 patches where the processor expands
STRING_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}"
                   "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
PARTS_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% else %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
                  "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def _tokenizer(chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.add_tokens(["<image>", "</s>", "<s>"], special_tokens=True)  # split out of "a</s>USER:"
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, pad_token_id=1, bos_token_id=2,
                       eos_token_id=EOS)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**HF_TINY_VISION), text_config=text,
                         image_token_index=IMAGE_TOKEN, image_seq_length=16, pad_token_id=1)
    model = ahf.alphafy_llava(LlavaForConditionalGeneration(config)).eval()
    emb = ahf.vision_body(_llava_core(model).vision_tower).embeddings
    torch.nn.init.normal_(emb.patch_embedding_alpha.weight, std=0.2)  # so that the region matters
    return model


def _collator(model, template="llava_v1", **kw):
    source = {"llava_v1": None, "chat": STRING_TEMPLATE, "parts": PARTS_TEMPLATE}[template]
    processor = ahf.AlphaLlavaProcessor.from_model(model, _tokenizer(source))
    return ahf.RegionConversationCollator(processor, template="llava_v1" if template == "llava_v1" else "auto", **kw)


def _image(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8))  # textured, not square


def _mask(y0, y1, x0, x1):
    m = np.zeros((40, 52), np.float32)
    m[y0:y1, x0:x1] = 1
    return m


def _samples():
    multi = [("human", "<image>\nwhat is this ?"), ("gpt", "a red circle"), ("human", "and there ?"),
             ("gpt", "a small blue square on the left")]
    single = [("human", "<image>\nwhat is this ?"), ("gpt", "the big square")]
    return [ConversationSample(_image(0), _mask(4, 20, 6, 30), multi, "multi"),
            ConversationSample(_image(1), _mask(20, 40, 26, 52), single, "single")]


def _runs(row):
    """Contiguous runs of labelled positions."""
    runs, current = [], []
    for i, v in enumerate(row.tolist()):
        if v != IGNORE_INDEX:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", ["llava_v1", "chat", "parts"])
def test_only_assistant_tokens_carry_loss(llava, template):
    collator = _collator(llava, template, system="" if template == "llava_v1" else None)
    samples = _samples()
    batch = collator(samples)
    tok = collator.tokenizer
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, sample in enumerate(samples):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        kept = labels != IGNORE_INDEX
        assert torch.equal(labels[kept], ids[kept])  # labels are the tokens themselves (the model shifts them)
        answers = [text for role, text in sample.turns if role == "gpt"]
        runs = _runs(labels)
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers):
            assert tok.decode(ids[run[:-1]]) == answer and ids[run[-1]] == EOS  # the answer, then its end of turn
        assert (ids == IMAGE_TOKEN).sum() == IMAGE_TOKENS
        assert not (ids == tok.unk_token_id).any()  # every prompt word is in the vocabulary: the template was used
        # Independently of the offsets: every token after an assistant marker up to its </s> is labelled, and
        # nothing else (no marker, no question, no padding).
        marker = tok.convert_tokens_to_ids("assistant:" if template == "chat" else "ASSISTANT:")
        expected, inside = torch.full_like(ids, IGNORE_INDEX), False
        for i, t in enumerate(ids.tolist()):
            if inside:
                expected[i] = t
                inside = t != EOS
            elif t == marker:
                inside = True
        assert torch.equal(labels, expected)
        assert (ids == marker).sum() == len(answers)
    short = batch["attention_mask"][1]  # right padding: the shorter sample ends with padding, not in the loss
    n = int(short.sum())
    assert short[:n].all() and not short[n:].any() and n < batch["input_ids"].shape[1]
    assert (batch["input_ids"][1, n:] == PAD).all() and (batch["labels"][1, n:] == IGNORE_INDEX).all()


def test_llava_v1_prompt_is_llavas_conversation(llava):
    collator = _collator(llava)
    text, spans = collator.prompt(_samples()[0].turns)
    assert text == ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the human's questions. USER: <image>\nwhat is this ? "
                    "ASSISTANT: a red circle</s>USER: and there ? ASSISTANT: a small blue square on the left</s>")
    assert [text[s:e] for s, e in spans] == ["a red circle</s>", "a small blue square on the left</s>"]


def _projector(model):
    return _llava_core(model).multi_modal_projector


def test_loss_falls_with_only_the_projector_trainable(llava):
    collator = _collator(llava)
    model = LlavaForConditionalGeneration(llava.config)
    model.load_state_dict(llava.state_dict())
    model.train().requires_grad_(False)
    _projector(model).requires_grad_(True)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "multi_modal_projector" not in k}
    batch = model_inputs(collator(_samples()))
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _projector(model).parameters())
    model.zero_grad()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(10):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # A random tiny LM is near-uniform (ln 64 = 4.16); the projector alone moves it steadily, if not far.
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # tower and LM bit-identical


def test_batch_equals_per_sample_collation_and_regions_differ(llava):
    collator = _collator(llava)
    samples = _samples()
    same_image = [ConversationSample(samples[0].image, samples[1].region, samples[1].turns, "other region")]
    batch = collator([samples[0], same_image[0]])
    alpha = batch["pixel_values"][:, 3]
    assert torch.equal(batch["pixel_values"][0, :3], batch["pixel_values"][1, :3])
    assert (alpha[0] - alpha[1]).abs().max() > 1  # another region, another alpha
    reference = ahf.AlphaCLIPImageProcessor(image_size=32)(samples[0].image, regions=[samples[0].region])["pixel_values"]
    assert torch.equal(batch["pixel_values"][0], reference[0])  # the package's one geometry
    with torch.no_grad():
        logits = llava(**model_inputs(batch)).logits
        for row, sample in enumerate([samples[0], same_image[0]]):
            alone = collator([sample])
            n = alone["input_ids"].shape[1]
            for key in ("input_ids", "labels", "attention_mask"):
                assert torch.equal(batch[key][row, :n], alone[key][0])
            assert torch.equal(batch["pixel_values"][row], alone["pixel_values"][0])
            ref = llava(**model_inputs(alone)).logits
            m = ref.shape[1]  # = n where the processor expands <image>; 4.37's model expands it itself
            assert (logits[row, :m] - ref[0]).abs().max() < 1e-4


def test_absent_region_gets_whole_image_alpha(llava, tmp_path):
    _image(3).save(tmp_path / "a.png")
    line = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat is this ?"},
                                                 {"from": "gpt", "value": "a red circle"}]}
    (tmp_path / "s.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({**line, "region": None}) + "\n")
    dataset = ConversationDataset.from_file(tmp_path / "s.jsonl")
    batch = _collator(llava)([dataset[0], dataset[1]])
    assert torch.equal(batch["pixel_values"][:, 3], torch.full((2, 32, 32), ALPHA_FOREGROUND))
    rgb = ahf.AlphaCLIPImageProcessor(image_size=32)(Image.open(tmp_path / "a.png"))["pixel_values"][0, :3]
    assert torch.equal(batch["pixel_values"][0, :3], rgb)


def test_bad_samples_are_skipped_and_listed_in_the_batch(llava):
    collator = _collator(llava, max_length=IMAGE_TOKENS + 40)
    samples = _samples()
    long = ConversationSample(samples[1].image, None, [("human", "<image>\n" + "w1 " * 60), ("gpt", "w2")], "long")
    batch = collator([samples[1], BadSample("s.jsonl:3", "bad region: box outside"), long])
    assert batch["names"] == ["single"] and batch["input_ids"].shape[0] == 1 and batch["tried"] == 3
    assert batch["bad"][0] == ("s.jsonl:3", "bad region: box outside")
    assert batch["bad"][1][0] == "long" and "max_length" in batch["bad"][1][1]
    health = DataHealth(max_bad_fraction=0.9)
    health.update(batch)
    assert (health.tried, health.bad) == (3, 2)
    empty = collator([BadSample("x", "y")])
    assert "input_ids" not in empty and empty["bad"] == [("x", "y")]


@pytest.mark.parametrize("template", ["llava_v1", "chat"])
def test_generation_batches_are_left_padded_and_generate_as_alone(llava, template):
    collator = _collator(llava, template, generation=True)
    samples = _samples()
    batch = collator(samples)
    assert "labels" not in batch and batch["targets"] == ["a small blue square on the left", "the big square"]
    prompt_end = collator.tokenizer.convert_tokens_to_ids("ASSISTANT:" if template == "llava_v1" else "assistant:")
    assert (batch["input_ids"][:, -1] == prompt_end).all()  # every prompt ends where generation starts
    mask = batch["attention_mask"]
    short = int(mask.sum(1).argmin())
    n = int(mask[short].sum())
    assert not mask[short, :-n].any() and mask[short, -n:].all() and (batch["input_ids"][short, :-n] == PAD).all()
    kw = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=PAD)
    with torch.no_grad():
        together = llava.generate(**model_inputs(batch), **kw)
        for row, sample in enumerate(samples):
            alone = llava.generate(**model_inputs(collator([sample])), **kw)
            assert torch.equal(together.sequences[row, -3:], alone.sequences[0, -3:])
            for step in range(3):
                assert (together.scores[step][row] - alone.scores[step][0]).abs().max() < 1e-4
