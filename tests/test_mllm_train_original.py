"""``export.original_llava``: a LLaVA fine-tuned by ``train-mllm`` loads with the original LLaVA code base's
``load_pretrained_model`` (with docs/llava.md's builder patch) and gives the transformers export's logits.

Runs where ``llava`` is importable (the transformers-4.37.2 venv of ``scripts/hf_venvs.sh``).
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

if importlib.util.find_spec("llava") is None:
    pytest.skip("needs the original LLaVA code base: run in `bash scripts/hf_venvs.sh tf-4.37.2`'s venv",
                allow_module_level=True)

import alphaclip_plugins.integrations.hf as ahf  # noqa: E402
from alphaclip_plugins.train.config import load_config  # noqa: E402
from alphaclip_plugins.train.mllm_config import MLLMTrainConfig  # noqa: E402
from alphaclip_plugins.train.mllm_data import ConversationDataset  # noqa: E402
from alphaclip_plugins.train.mllm_trainer import train_mllm  # noqa: E402
from conftest import HF_TINY_VISION  # noqa: E402
from test_hf_llava_original import llava  # noqa: E402,F401  (the patched LLaVA package fixture)
from test_hf_mllm_data import EOS, IMAGE_TOKEN, _tokenizer  # noqa: E402
from test_mllm_train import _text_config, _write_data  # noqa: E402
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

TOL = 1e-5


def test_original_llava_export_loads_and_matches(llava, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    text = _text_config()
    text.vocab_size = len(_tokenizer())  # LLaVA's loader resizes the embeddings to the tokenizer's length
    config = LlavaConfig(vision_config=CLIPVisionConfig(**HF_TINY_VISION), text_config=text,
                         image_token_index=IMAGE_TOKEN, pad_token_id=1)
    ahf.alphafy_llava(LlavaForConditionalGeneration(config)).save_pretrained(tmp_path / "model")
    _tokenizer().save_pretrained(tmp_path / "model")
    _write_data(tmp_path)
    overrides = {"model.path": str(tmp_path / "model"), "model.train_tower": "alpha", "data.train": str(tmp_path / "train.jsonl"),
                 "data.num_workers": 0, "optim.lr": 3e-2, "optim.warmup_steps": 1, "output_dir": str(tmp_path / "run"),
                 "steps": 2, "batch_size": 2, "threads": 1, "save_every": 0, "tensorboard": False, "progress": False,
                 "export.original_llava": True}
    final = train_mllm(load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()], MLLMTrainConfig))
    original = final.parent / "final-llava"
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, _ = load_pretrained_model(str(original), None, original.name, device="cpu",
                                                                 device_map="cpu")
    assert isinstance(model.get_vision_tower(), ahf.AlphaCLIPVisionTower)
    model.float()
    # load_pretrained_model returns fp16 weights: compare in fp32 with the transformers export rounded alike
    hf = LlavaForConditionalGeneration.from_pretrained(final).eval().half().float()
    sample = ConversationDataset.from_file(tmp_path / "train.jsonl")[0]
    pixels = image_processor.preprocess(sample.image, regions=[sample.region], return_tensors="pt")["pixel_values"]
    ids = tokenizer_image_token("USER: <image>\nwhat is this ? ASSISTANT:", tokenizer, IMAGE_TOKEN_INDEX,
                                return_tensors="pt").unsqueeze(0)
    with torch.no_grad():
        mask = torch.ones_like(ids)
        theirs = model(input_ids=ids, attention_mask=mask, images=pixels).logits
        ours = hf(input_ids=ids.masked_fill(ids == IMAGE_TOKEN_INDEX, IMAGE_TOKEN), attention_mask=mask,
                  pixel_values=pixels).logits
    assert theirs.shape == ours.shape and (theirs - ours).abs().max() < TOL
    start = ahf.vision_body(LlavaForConditionalGeneration.from_pretrained(tmp_path / "model").vision_tower)
    tower = ahf.vision_body(model.get_vision_tower().vision_tower)
    trained = tower.embeddings.patch_embedding_alpha.weight
    assert not torch.equal(trained, start.embeddings.patch_embedding_alpha.weight)  # the fine-tuned alpha conv
    assert EOS == tokenizer.eos_token_id
