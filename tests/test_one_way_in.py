"""One way in: the same files through every entry point give the same tower, or the same error.

Each entry point loads a file into its own model; its weights are read back in canonical keys and
compared with the tower the file was written from. A truncated file and a file of another architecture
must fail everywhere with the core's CheckpointError.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch

from alphaclip_plugins import create_model
from alphaclip_plugins.cli import main as cli_main
from alphaclip_plugins.core.checkpoint import load_checkpoint
from alphaclip_plugins.core.convert import to_alphaclip
from alphaclip_plugins.core.io import CheckpointError, read_state_dict
from checkpoint_files import hf_dir, official_file, open_clip_file, openai_file, timm_file, truncated_copy
from conftest import HF_TINY_VISION, import_or_skip, random_alpha_conv_

Tower = Dict[str, torch.Tensor]
TINY_DEPTH = 2  # the core "tiny" tower's blocks (timm's tiny variant has 3 by default, for timm's feature tests)


def _visual(sd: Dict[str, torch.Tensor]) -> Tower:
    """Canonical tower keys (no ``visual.``) of a state dict of any layout."""
    return {k[7:]: v for k, v in to_alphaclip(sd).items() if k.startswith("visual.")}


def _core(path: Path) -> Tower:
    tower = create_model("tiny").visual
    load_checkpoint(tower, path)
    return tower.state_dict()


def _create_model(path: Path) -> Tower:
    return create_model("tiny", alpha_checkpoint=path).visual.state_dict()


def _trainer(path: Path) -> Tower:
    from alphaclip_plugins.train.config import ModelConfig, TrainConfig
    from alphaclip_plugins.train.modeling import build_model

    return build_model(TrainConfig(model=ModelConfig(name="tiny", alpha_checkpoint=str(path))),
                       torch.device("cpu")).visual.state_dict()


def _cli(path: Path) -> Tower:
    """``alphaclip convert TOWER OUT --to alphaclip --clip CLIP``: the tower joins the text tower of a CLIP."""
    out = path.parent / f"cli-{path.name}-out"
    # --debug: the CLI raises the error itself rather than printing it as one line (tests/test_cli_errors.py)
    cli_main(["--debug", "convert", str(path), str(out), "--to", "alphaclip", "--clip",
              str(path.parent / "ViT-tiny.pt"), "--model", "tiny", "--force"])
    return _visual(read_state_dict(out / "model.safetensors"))


def _timm(path: Path) -> Tower:
    timm = import_or_skip("timm")
    import alphaclip_plugins.integrations.timm  # noqa: F401

    model = timm.create_model("alphaclip_vit_tiny_patch8_32.grit1m", pretrained=True, depth=TINY_DEPTH,
                              pretrained_cfg_overlay=dict(file=str(path)))
    return _visual(model.state_dict())


def _timm_load_state_dict(path: Path) -> Tower:
    timm = import_or_skip("timm")
    import alphaclip_plugins.integrations.timm  # noqa: F401

    model = timm.create_model("alphaclip_vit_tiny_patch8_32", depth=TINY_DEPTH)
    model.load_state_dict(read_state_dict(path))  # a foreign layout: converted by the model's load hook
    return _visual(model.state_dict())


def _open_clip(path: Path) -> Tower:
    import_or_skip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from alphaclip_plugins.integrations.open_clip import load_alpha_checkpoint, to_core

    model = CLIP(32, CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
                 CLIPTextCfg(width=32, heads=2, layers=2), quick_gelu=True)
    load_alpha_checkpoint(model, path)
    return to_core(model).visual.state_dict()


def _hf(path: Path) -> Tower:
    import_or_skip("transformers")
    import alphaclip_plugins.integrations.hf as ahf

    tower = ahf.AlphaCLIPVisionModel(ahf.AlphaCLIPVisionConfig(**HF_TINY_VISION))
    ahf.load_alpha_weights(tower, path)
    return _visual(tower.state_dict())  # a bare tower: no projection


def _mmdet(path: Path) -> Tower:
    import_or_skip("mmdet")
    from alphaclip_plugins.integrations.mmdet import AlphaCLIPViT

    backbone = AlphaCLIPViT(arch="tiny", init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    backbone.init_weights()
    return backbone.visual.state_dict()


def _detectron2(path: Path) -> Tower:
    import_or_skip("detectron2", allow_missing=True)  # not on PyPI: skips even under CI
    from detectron2.modeling import build_model

    from alphaclip_plugins.integrations.detectron2 import AlphaCLIPCheckpointer
    from test_detectron2 import _yacs

    model = build_model(_yacs("faster_rcnn_alphaclip_vit_b16_sfp.yaml"))
    AlphaCLIPCheckpointer(model).load(str(path))  # the safe reader, then the model's load hook
    return model.backbone.net.visual.state_dict()


ENTRY_POINTS: Dict[str, Callable[[Path], Tower]] = {
    "load_checkpoint": _core, "create_model": _create_model, "trainer": _trainer, "cli convert": _cli,
    "timm pretrained file": _timm, "timm load_state_dict": _timm_load_state_dict, "open_clip": _open_clip,
    "hf load_alpha_weights": _hf, "mmdet init_cfg": _mmdet, "detectron2 checkpointer": _detectron2,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A fine-tuned tiny Alpha-CLIP in every layout, plus a truncated and a wrong-architecture file."""
    d = tmp_path_factory.mktemp("files")
    model = create_model("tiny", seed=3)
    random_alpha_conv_(model, seed=4)
    with torch.no_grad():
        model.visual.transformer.resblocks[0].mlp.c_fc.bias.add_(0.1)
    wide = create_model("tiny", vision_width=96, vision_heads=2)
    good = {
        "official": official_file(model, d / "clip_tiny_grit1m_fultune_8xe.pth"),
        "openai torchscript": openai_file(model, d / "ViT-tiny.pt"),  # plain CLIP: the alpha conv stays zero
        "open_clip": open_clip_file(model, d / "epoch_3.pt"),
        "hf": hf_dir(model, d / "hf"),
        "timm": timm_file(model, d / "timm.safetensors"),
    }
    bad = {
        "truncated": truncated_copy(good["official"], d / "truncated.pth"),
        "wrong architecture": official_file(wide, d / "wide.pth"),
    }
    expected = model.visual.state_dict()
    plain = {**expected, "conv1_alpha.weight": torch.zeros_like(expected["conv1_alpha.weight"])}
    return good, bad, expected, plain


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_layout_gives_the_same_tower_everywhere(entry, files):
    good, _, expected, plain = files
    for layout, path in good.items():
        got = ENTRY_POINTS[entry](path)
        want = plain if layout == "openai torchscript" else expected
        want = {k: v for k, v in want.items() if k in got} if entry == "hf load_alpha_weights" else want
        assert got.keys() == want.keys(), (entry, layout, set(got) ^ set(want))
        for k in want:
            assert torch.equal(got[k], want[k]), (entry, layout, k)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_broken_files_fail_with_the_same_error_everywhere(entry, files):
    _, bad, _, _ = files
    with pytest.raises(CheckpointError, match=r"truncated\.pth.*corrupt, truncated or not a checkpoint"):
        ENTRY_POINTS[entry](bad["truncated"])
    # A state dict handed over in memory (timm's load_state_dict) has no file name to show.
    source = r"the checkpoint" if entry == "timm load_state_dict" else r"wide\.pth"
    with pytest.raises(CheckpointError, match=source + r" holds .*vision_width 96.*vision_width differ"):
        ENTRY_POINTS[entry](bad["wrong architecture"])


def test_info_reports_the_layout_of_each_file(files, capsys):
    good, _, _, _ = files
    layouts = {}
    for name, path in good.items():
        cli_main(["info", str(path), "--json"])
        layouts[name] = json.loads(capsys.readouterr().out)["layout"]
    assert layouts == {"official": "official", "openai torchscript": "alphaclip", "open_clip": "alphaclip",
                       "hf": "hf", "timm": "timm"}


def test_a_file_of_another_architecture_is_refused_before_the_model_is_built(files, monkeypatch):
    import alphaclip_plugins.core.factory as factory

    _, bad, _, _ = files

    def no_model(cfg):
        raise AssertionError(f"a {cfg.vision.width}-wide model was built before the file was checked")

    monkeypatch.setattr(factory, "AlphaCLIP", no_model)
    with pytest.raises(CheckpointError, match="wide.pth holds .* but the model is ViT-L/14 .*vision_width"):
        create_model("ViT-L/14", alpha_checkpoint=bad["wrong architecture"])
    with pytest.raises(CheckpointError, match="wide.pth holds .* but the model is ViT-L/14 .*vision_width"):
        create_model("ViT-L/14", pretrained=bad["wrong architecture"], strict=False)
