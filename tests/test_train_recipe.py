"""The paper recipe: frozen towers stay bit-identical, learning-rate groups, schedule, loss, text cache, LoRA."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import import_or_skip
import torch.nn.functional as F

from alphaclip_plugins import create_model, from_pretrained, tokenize
from alphaclip_plugins.train.config import config_from_dict
from alphaclip_plugins.train.loss import ContrastiveLoss
from alphaclip_plugins.train.modeling import TextFeatureCache, build_model, text_parameters
from alphaclip_plugins.train.optim import build_optimizer, lr_factor
from alphaclip_plugins.train.synthetic import SyntheticConfig, write_jsonl
from alphaclip_plugins.train.trainer import train
from train_utils import TINY_SHAPES_DATA, tiny_config


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return str(write_jsonl(tmp_path_factory.mktemp("shapes"), SyntheticConfig(num_images=12, **TINY_SHAPES_DATA)))


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_paper_recipe_keeps_text_tower_and_logit_scale_bit_identical(tmp_path, manifest):
    cfg = config_from_dict(tiny_config(tmp_path, manifest, steps=4))
    start = _weights(build_model(cfg, torch.device("cpu")))
    final = from_pretrained(train(cfg))
    end = _weights(final)
    text_keys = [k for k in start if not k.startswith("visual.") and k != "logit_scale"]
    assert text_keys and all(torch.equal(start[k], end[k]) for k in text_keys)
    assert torch.equal(end["logit_scale"], torch.tensor(math.log(100.0)))
    assert not torch.equal(start["visual.conv1_alpha.weight"], end["visual.conv1_alpha.weight"])
    assert start["visual.conv1_alpha.weight"].abs().max() == 0  # zero-initialised: a fresh model is CLIP
    changed = [k for k in start if k.startswith("visual.") and not torch.equal(start[k], end[k])]
    assert len(changed) == len([k for k in start if k.startswith("visual.")])  # the whole vision tower trained


def test_learning_rate_groups_and_weight_decay():
    cfg = config_from_dict({"model": {"name": "tiny"}})
    model = build_model(cfg, torch.device("cpu"))
    groups = {g["name"]: g for g in build_optimizer(model, cfg.optim).param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert members["alpha"] == {"visual.conv1_alpha.weight"} and groups["alpha"]["lr"] == pytest.approx(1e-4)
    assert groups["vision"]["lr"] == pytest.approx(1e-6) and groups["vision_no_decay"]["lr"] == pytest.approx(1e-6)
    assert "visual.conv1.weight" in members["vision"] and "visual.class_embedding" in members["vision_no_decay"]
    assert all(not n.startswith("visual.") or "conv1_alpha" not in n for n in members["vision"])
    assert not any(k.startswith("text") for k in groups)  # frozen text tower: not in the optimizer
    for key, group in groups.items():
        params = [p for p in group["params"]]
        if key.endswith("no_decay"):
            assert group["weight_decay"] == 0.0
        else:
            assert group["weight_decay"] == pytest.approx(0.02) and all(p.ndim >= 2 for p in params)
    decayed = members["alpha"] | members["vision"]
    assert not any(n.endswith(("bias", "ln_pre.weight", "positional_embedding")) for n in decayed)


def test_warmup_then_cosine():
    factors = [lr_factor(s, total=100, warmup=10, min_ratio=0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:9], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1) and factors[55] == pytest.approx(0.55)


def _reference_clip_loss(img, txt, scale, smoothing):
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels, label_smoothing=smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=smoothing)) / 2


def test_contrastive_loss():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1), F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(100.0)
    loss = ContrastiveLoss()
    assert loss(img, txt, scale) == pytest.approx(_reference_clip_loss(img, txt, 100.0, 0.1).item(), rel=1e-6)
    assert loss(img, txt, scale) != pytest.approx(_reference_clip_loss(img, txt, 100.0, 0.0).item())
    # Equal captions have equal features: their tied rows and columns give the loss of shared positives.
    txt_dup = txt.clone()
    txt_dup[1] = txt_dup[0]
    targets = torch.eye(6)
    targets[:2, :2] = 0.5
    logits = 100.0 * img @ txt_dup.T
    shared = (F.cross_entropy(logits, targets, label_smoothing=0.1)
              + F.cross_entropy(logits.T, targets, label_smoothing=0.1)) / 2
    assert loss(img, txt_dup, scale) == pytest.approx(shared.item(), rel=1e-5)


def test_text_feature_cache_encodes_each_caption_once_and_exactly():
    model = create_model("tiny")
    cache = TextFeatureCache(model, chunk=4)
    first = cache(["a red circle", "a blue square", "a red circle"])
    assert cache.encoded == 2
    second = cache(["a green cross", "a blue square", "a yellow triangle", "a purple circle", "a red square"])
    assert cache.encoded == 6 and torch.equal(second[1], first[1])
    with torch.no_grad():
        ref = model.encode_text(tokenize(["a red circle", "a green cross"]), normalize=True)
    assert torch.allclose(first[0], ref[0], atol=1e-6) and torch.allclose(second[0], ref[1], atol=1e-6)
    other = TextFeatureCache(model, chunk=4)  # other captions new at the same time: same bits
    assert torch.equal(other(["a green cross", "x", "y", "z", "w"])[0], second[0])
    assert not any(p.requires_grad for p in text_parameters(build_model(config_from_dict({"model": {"name": "tiny"}}),
                                                                        torch.device("cpu"))))


def test_grad_checkpointing_and_bf16_autocast_train(tmp_path, manifest):
    runs = {}
    for name, over in {"plain": {}, "ckpt": {"model.grad_checkpointing": True}}.items():
        cfg = config_from_dict(tiny_config(tmp_path / name, manifest, steps=3, **over))
        runs[name] = _weights(from_pretrained(train(cfg)))
    assert all(torch.allclose(runs["plain"][k], runs["ckpt"][k], atol=1e-6) for k in runs["plain"])
    cfg = config_from_dict(tiny_config(tmp_path / "bf16", manifest, steps=2, precision="bf16"))
    bf16 = _weights(from_pretrained(train(cfg)))
    assert all(torch.isfinite(v).all() for v in bf16.values())
    assert not torch.equal(bf16["visual.conv1_alpha.weight"], torch.zeros_like(bf16["visual.conv1_alpha.weight"]))


def test_lora_trains_adapters_and_exports_a_plain_model(tmp_path, manifest):
    import_or_skip("peft")
    cfg = config_from_dict(tiny_config(tmp_path, manifest, steps=3, **{"model.lora_rank": 4}))
    model = build_model(cfg, torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(n.endswith("conv1_alpha.weight") for n in trainable)
    assert not any(("lora_" not in n and "conv1_alpha" not in n) for n in trainable)
    start = _weights(create_model("tiny", seed=cfg.seed))
    final = from_pretrained(train(cfg))  # merged: loads into the plain core model, strictly
    end = _weights(final)
    assert set(end) == set(start)
    assert not torch.equal(start["visual.conv1_alpha.weight"], end["visual.conv1_alpha.weight"])
    assert not torch.equal(start["visual.transformer.resblocks.0.mlp.c_fc.weight"],
                           end["visual.transformer.resblocks.0.mlp.c_fc.weight"])  # adapter merged in
    assert torch.equal(start["visual.transformer.resblocks.0.attn.in_proj_weight"],
                       end["visual.transformer.resblocks.0.attn.in_proj_weight"])  # not a LoRA target
