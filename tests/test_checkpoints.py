"""Every checkpoint layout users hold, written in its true on-disk format, loaded and compared."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from alphaclip_plugins import create_model, from_pretrained, save_pretrained
from alphaclip_plugins.core.checkpoint import export_state_dict, load_checkpoint, save_official, save_weights
from alphaclip_plugins.core.convert import FORMATS, detect_format, from_alphaclip, to_alphaclip
from alphaclip_plugins.core.io import CheckpointError, read_state_dict
from checkpoint_files import official_layout, openai_layout, torchscript_archive
from conftest import import_or_skip, HF_TINY_VISION, random_alpha, random_alpha_conv_


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture
def clip_source():
    """A plain CLIP (random, different seed from create_model's default) and an Alpha-CLIP fine-tune of it."""
    clip = create_model("tiny", seed=7)
    alpha = create_model("tiny", seed=7)
    random_alpha_conv_(alpha)
    with torch.no_grad():
        for p in alpha.visual.transformer.parameters():
            p.add_(0.01)
    return clip, alpha


def test_openai_torchscript_archive_then_official_alpha_pth(tmp_path, clip_source):
    clip, alpha = clip_source
    torchscript_archive(openai_layout(clip), tmp_path / "ViT-tiny.pt")
    torch.save(official_layout(alpha), tmp_path / "clip_tiny_grit1m_fultune_8xe.pth")
    model = create_model("tiny", pretrained=tmp_path / "ViT-tiny.pt",
                         alpha_checkpoint=tmp_path / "clip_tiny_grit1m_fultune_8xe.pth")
    reports = [load_checkpoint(create_model("tiny"), tmp_path / "ViT-tiny.pt"),
               load_checkpoint(create_model("tiny").visual, tmp_path / "clip_tiny_grit1m_fultune_8xe.pth")]
    assert [r.format for r in reports] == ["alphaclip", "official"]
    assert reports[0].new_alpha and not reports[1].new_alpha
    _assert_same_weights(model.visual, alpha.visual)
    _assert_same_weights(model.transformer, clip.transformer)
    image, a = torch.randn(2, 3, 32, 32), random_alpha(2, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(image, a), alpha.encode_image(image, a))


def test_training_checkpoint_with_module_prefix_and_open_clip_nesting(tmp_path, clip_source):
    _, alpha = clip_source
    torch.save({"module." + k: v for k, v in official_layout(alpha).items()}, tmp_path / "ddp.pth")
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in alpha.state_dict().items()}},
               tmp_path / "epoch_3.pt")
    a = create_model("tiny", alpha_checkpoint=tmp_path / "ddp.pth")
    b = create_model("tiny", pretrained=tmp_path / "epoch_3.pt")
    _assert_same_weights(a.visual, alpha.visual)
    _assert_same_weights(b, alpha)


def test_hugging_face_directories(tmp_path, clip_source):
    import_or_skip("transformers")
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    _, alpha = clip_source
    vision = HF_TINY_VISION
    text = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=49408, max_position_embeddings=77, eos_token_id=49407)
    hf = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    sd = from_alphaclip({k: v for k, v in alpha.state_dict().items() if "conv1_alpha" not in k}, "hf")
    hf.load_state_dict(sd, strict=True)
    hf.save_pretrained(tmp_path / "clip")
    tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
    tower.load_state_dict({k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))})
    tower.save_pretrained(tmp_path / "tower")
    model = create_model("tiny", pretrained=tmp_path / "clip")
    report = load_checkpoint(create_model("tiny"), tmp_path / "clip")
    assert report.format == "hf" and report.new_alpha
    _assert_same_weights(model.transformer, alpha.transformer)
    ref = create_model("tiny")
    load_checkpoint(ref.visual, tmp_path / "tower")
    for k, v in ref.visual.state_dict().items():
        if "conv1_alpha" not in k:
            assert torch.equal(v, alpha.visual.state_dict()[k]), k
    with pytest.raises(CheckpointError, match="missing .*token_embedding"):
        create_model("tiny", pretrained=tmp_path / "tower")


def test_timm_safetensors_into_vision_tower(tmp_path, clip_source):
    _, alpha = clip_source
    save_weights(alpha, tmp_path / "timm.safetensors", fmt="timm")
    sd = read_state_dict(tmp_path / "timm.safetensors")
    assert detect_format(sd) == "timm" and "patch_embed.proj_alpha.weight" in sd and "head.bias" in sd
    model = create_model("tiny", alpha_checkpoint=tmp_path / "timm.safetensors")
    _assert_same_weights(model.visual, alpha.visual)


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_reimport_round_trips_bit_exactly(fmt, clip_source):
    _, alpha = clip_source
    exported = export_state_dict(alpha, fmt)
    back = to_alphaclip(exported)
    own = alpha.state_dict()
    expected = own if fmt not in ("official", "timm") else {k: v for k, v in own.items() if k.startswith("visual.")}
    assert back.keys() == expected.keys()
    for k in expected:
        assert torch.equal(back[k], expected[k]), k


def test_save_official_is_read_by_the_original_layout(tmp_path, clip_source):
    _, alpha = clip_source
    save_official(alpha, tmp_path / "finetune.pth")
    sd = torch.load(tmp_path / "finetune.pth", weights_only=True)
    assert "conv1_alpha.weight" in sd and "transformer.resblocks.0.attn.in_proj.weight" in sd
    assert not any(k.startswith("visual.") for k in sd)


def test_save_pretrained_round_trip(tmp_path, clip_source):
    _, alpha = clip_source
    save_pretrained(alpha, tmp_path / "run")
    _assert_same_weights(from_pretrained(tmp_path / "run"), alpha)
    _assert_same_weights(create_model(None, pretrained=tmp_path / "run"), alpha)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv1.weight": _Exploit()}, f)
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Exploit()}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(CheckpointError, match="refusing to unpickle|corrupt"):
            create_model("tiny", alpha_checkpoint=tmp_path / name)
    assert not (tmp_path / "pwned").exists()


def test_wrong_architecture_names_what_the_file_holds(tmp_path):
    big = create_model("tiny", vision_width=128, vision_heads=4)
    torch.save(official_layout(big), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"vision_width 128.*the model is tiny"):
        create_model("tiny", alpha_checkpoint=tmp_path / "other.pth")


def test_corrupt_and_truncated_files(tmp_path, clip_source):
    _, alpha = clip_source
    save_weights(alpha, tmp_path / "w.safetensors")
    save_weights(alpha, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="corrupt, truncated"):
            create_model("tiny", pretrained=tmp_path / name)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "junk.bin")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.pth")


def test_strict_load_names_keys_and_partial_load_reports_them(clip_source):
    _, alpha = clip_source
    sd = alpha.state_dict()
    sd.pop("ln_final.weight")
    sd["extra.weight"] = torch.zeros(1)
    model = create_model("tiny")
    with pytest.raises(CheckpointError, match=r"missing ln_final.weight; unexpected extra.weight"):
        load_checkpoint(model, sd, strict=True)
    result = load_checkpoint(model, sd, strict=False)
    assert result.missing == ("ln_final.weight",) and result.unexpected == ("extra.weight",)


def test_failed_write_keeps_the_previous_file(tmp_path, clip_source, monkeypatch):
    _, alpha = clip_source
    path = tmp_path / "w.safetensors"
    save_weights(alpha, path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_weights(create_model("tiny"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_larger_image_size_resamples_positions(tmp_path, clip_source):
    _, alpha = clip_source
    torch.save(official_layout(alpha), tmp_path / "a.pth")
    model = create_model("tiny", alpha_checkpoint=tmp_path / "a.pth", vision_image_size=48)
    assert model.visual.positional_embedding.shape == (37, 64)
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(torch.randn(1, 3, 48, 48))).all()
