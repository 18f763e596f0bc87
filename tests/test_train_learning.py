"""Training teaches the model to use the alpha channel: region retrieval goes from chance to >= 0.9 while
whole-image alpha on the same samples stays near chance (each image shows four described shapes)."""
from __future__ import annotations

import json

import pytest
import torch

from alphaclip_plugins import save_pretrained
from alphaclip_plugins.core.model import AlphaCLIP
from alphaclip_plugins.core.processor import RegionProcessor
from alphaclip_plugins.train.config import config_from_dict
from alphaclip_plugins.train.data import read_jsonl
from alphaclip_plugins.train.default_model import load_default_model
from alphaclip_plugins.train.evaluate import decode_all, retrieval_top1
from alphaclip_plugins.train.synthetic import SyntheticConfig, write_jsonl
from alphaclip_plugins.train.trainer import train


def _top1(model, pixels, alpha, captions):
    return retrieval_top1(lambda p, a: model.encode_image(p, a, normalize=True),
                          lambda t: model.encode_text(t, normalize=True), pixels, alpha, captions, torch.device("cpu"))


@pytest.mark.slow
def test_training_teaches_the_model_to_use_alpha(tmp_path):
    # The paper recipe (frozen text tower and logit scale, cached text features) from a model whose text
    # tower knows the shape words (the embedded model's) and whose vision tower is random.
    known = load_default_model()
    torch.manual_seed(1)
    start = AlphaCLIP(known.cfg)
    text_tower = {k: v for k, v in known.state_dict().items() if not k.startswith("visual.")}
    start.load_state_dict({**start.state_dict(), **text_tower})
    save_pretrained(start, tmp_path / "start")
    eval_manifest = write_jsonl(tmp_path / "eval", SyntheticConfig(num_images=100, seed=1, canonical=True))
    pixels, alpha, captions, _ = decode_all(read_jsonl(eval_manifest), RegionProcessor(64))
    before = _top1(start.eval(), pixels, alpha, captions)
    assert before["chance"] == pytest.approx(1 / 20) and before["region_top1"] < 0.25

    cfg = config_from_dict({
        "model": {"name": None, "pretrained": str(tmp_path / "start")},
        "data": {"train": str(tmp_path / "train" / "samples.jsonl"), "eval": str(eval_manifest), "num_workers": 0,
                 "synthetic": {"num_images": 600, "seed": 0}},
        "optim": {"lr": 2e-3, "lr_ratio": 1.0, "warmup_steps": 20},
        "output_dir": str(tmp_path / "run"), "steps": 160, "batch_size": 64, "threads": 1, "eval_every": 0,
        "save_every": 0, "tensorboard": False, "progress": False,
    })
    train(cfg)
    after = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert after["group"] == "eval" and after["samples"] == len(captions) == 400
    assert after["region_top1"] >= 0.9, after
    assert after["whole_image_top1"] <= 0.35, after  # at best one of the four shapes: ~1/4


def test_embedded_model_names_the_selected_shape_of_the_example():
    from PIL import Image

    from alphaclip_plugins import classify_regions
    from alphaclip_plugins.core.factory import DEFAULT_MODEL_DIR
    from alphaclip_plugins.train.default_model import default_labels

    assert sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir()) <= 10 * 2**20
    labels = default_labels()
    assert len(labels) == 20 and "red circle" in labels
    root = DEFAULT_MODEL_DIR.parents[2] / "examples"
    image, mask = Image.open(root / "shapes.png"), Image.open(root / "shapes_mask.png")
    probs = classify_regions(load_default_model(), image, [mask, None], labels)
    assert labels[int(probs[0].argmax())] == "red circle" and probs[0].max() > 0.5
    assert probs[1].max() < probs[0].max()  # the whole image holds four shapes: no single answer
