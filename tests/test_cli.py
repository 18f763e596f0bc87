"""The ``alphaclip`` command on checkpoints written by the tests."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from alphaclip_plugins import create_model
from alphaclip_plugins.cli import main
from alphaclip_plugins.core.checkpoint import save_official, save_weights
from alphaclip_plugins.core.io import read_state_dict
from conftest import random_alpha_conv_


@pytest.fixture
def files(tmp_path):
    model = create_model("tiny", seed=3)
    random_alpha_conv_(model)
    clip = tmp_path / "clip.safetensors"
    save_weights(create_model("tiny", seed=3), clip)  # a plain CLIP: zero alpha
    save_official(model, tmp_path / "alpha.pth")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    mask = np.zeros((30, 40), np.uint8)
    mask[5:20, 5:25] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return model, tmp_path


def test_classify_json(files, capsys):
    model, d = files
    main(["classify", str(d / "img.png"), "--mask", str(d / "mask.png"), "--box", "0,0,10,10",
          "--labels", "cat", "dog", "tree", "--pretrained", str(d / "clip.safetensors"),
          "--alpha-checkpoint", str(d / "alpha.pth"), "--templates", "clip", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert [r["region"] for r in out] == [f"mask {d / 'mask.png'}", "box 0,0,10,10"]
    assert all(len(r["labels"]) == 3 and abs(sum(r["probs"]) - 1) < 1e-4 for r in out)


def test_convert_to_official_and_back(files, tmp_path, capsys):
    model, d = files
    main(["convert", str(d / "alpha.pth"), str(tmp_path / "full"), "--to", "alphaclip",
          "--clip", str(d / "clip.safetensors")])
    main(["convert", str(tmp_path / "full"), str(tmp_path / "again.pth"), "--to", "official"])
    main(["convert", str(tmp_path / "full"), str(tmp_path / "timm.safetensors"), "--to", "timm"])
    again = read_state_dict(tmp_path / "again.pth")
    for k, v in model.visual.state_dict().items():
        assert torch.equal(again[k.replace("in_proj_weight", "in_proj.weight").replace("in_proj_bias", "in_proj.bias")], v)
    main(["info", str(tmp_path / "timm.safetensors"), "--json"])
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{"):])
    assert info["layout"] == "timm" and info["alpha"] == "trained" and info["towers"] == ["vision"]


def test_convert_plain_clip_to_official_adds_zero_alpha(files, tmp_path):
    _, d = files
    main(["convert", str(d / "clip.safetensors"), str(tmp_path / "o.pth"), "--to", "official"])
    assert not read_state_dict(tmp_path / "o.pth")["conv1_alpha.weight"].any()


def test_bad_box_and_missing_file_exit_with_a_message(files):
    _, d = files
    with pytest.raises(SystemExit):
        main(["classify", str(d / "img.png"), "--box", "1,2,3"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["info", str(d / "nope.pth")])
