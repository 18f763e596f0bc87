"""Careless-user inputs: corrupt regions, odd image modes, bad weights, huge sizes, overwrites. Each is an
error that says what was wrong, or is converted correctly; none is silently wrong."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from alphaclip_plugins import create_model, from_pretrained, save_pretrained
from alphaclip_plugins.core.config import CLIPConfig, get_config
from alphaclip_plugins.core.images import ImageError, open_image, open_mask
from alphaclip_plugins.core.io import CheckpointError, atomic_directory, read_state_dict, save_safetensors
from alphaclip_plugins.core.processor import RegionProcessor
from alphaclip_plugins.core.regions import region_mask
from alphaclip_plugins.core.resize import pad_resize
from alphaclip_plugins.core.zeroshot import classify_regions, text_classifier

H, W = 24, 40


def _textured(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- regions ---------------------------------------------------------------------------------------------


def test_rle_round_trips_and_corrupt_rle_is_refused():
    m = np.zeros((H, W), np.uint8)
    m[3:17, 5:31] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    assert np.array_equal(region_mask(rle, H, W), m)
    runs = [5 * H + 3, 14] + [H - 14, 14] * 25
    runs.append(H * W - sum(runs))
    assert np.array_equal(region_mask({"size": [H, W], "counts": runs}, H, W), m)
    bad = {
        "short": {"size": [H, W], "counts": runs[:-1]},
        "negative": {"size": [H, W], "counts": [-5] + runs[1:-1] + [runs[-1] + 5]},
        "garbage": {"size": [H, W], "counts": "\x01\x02garbage~~~"},
        "other size": {"size": [H + 1, W], "counts": rle["counts"]},
        "truncated string": {"size": [H, W], "counts": rle["counts"][:-1]},
    }
    for what, r in bad.items():
        with pytest.raises(ValueError, match="RLE"):
            region_mask(r, H, W)


def test_polygon_and_region_list_errors_are_value_errors():
    with pytest.raises(ValueError, match="polygon is empty"):
        region_mask({"polygon": []}, H, W)
    with pytest.raises(ValueError, match="at least 3"):
        region_mask({"polygon": [1, 1, 5, 5]}, H, W)
    p = RegionProcessor(32)
    with pytest.raises(ValueError, match="no regions"):
        p(_textured(), [])


def test_empty_mask_is_an_error_in_inference_apis(tiny_model):
    empty = np.zeros((H, W), np.uint8)
    with pytest.raises(ValueError, match="region 0 is empty"):
        RegionProcessor(32)(_textured(), [empty])
    with pytest.raises(ValueError, match="empty"):
        classify_regions(tiny_model, _textured(), [empty], ["cat", "dog"])
    with pytest.raises(ValueError, match="no regions"):
        classify_regions(tiny_model, _textured(), [], ["cat", "dog"])


def test_label_maps_are_refused_binary_masks_accepted():
    m = np.zeros((H, W), np.uint8)
    m[2:9, 3:12] = 2
    with pytest.raises(ValueError, match=r"integer values \{0, 2\}.*label map"):
        region_mask(m, H, W)
    for fg in (1, 255):
        assert np.array_equal(region_mask((m > 0).astype(np.uint8) * fg, H, W), (m > 0).astype(np.float32))


# --- images and masks from files ---------------------------------------------------------------------


def test_exif_orientation_is_applied_to_images_and_masks(tmp_path):
    pixels = _textured()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "photo.png", exif=exif)
    mask = np.zeros((H, W), np.uint8)
    mask[:, :10] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png", exif=exif)
    shown = np.rot90(pixels, k=-1)  # as a viewer displays it
    assert np.array_equal(np.asarray(open_image(tmp_path / "photo.png")), shown)
    assert np.array_equal(open_mask(tmp_path / "mask.png"), np.rot90(mask, k=-1) / 255.0)
    batch = RegionProcessor(32)(str(tmp_path / "photo.png"), [[0, 0, H, 10]])  # a box on the displayed photo
    ref = RegionProcessor(32)(shown.copy(), [[0, 0, H, 10]])
    assert torch.equal(batch.pixel_values, ref.pixel_values) and torch.equal(batch.alpha, ref.alpha)


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    mask = np.zeros((H, W), np.uint16)
    mask[4:10, 6:20] = 65535
    Image.fromarray(mask).save(tmp_path / "m16.png")
    assert np.array_equal(open_mask(tmp_path / "m16.png"), (mask > 0).astype(np.float32))
    grey = np.random.default_rng(1).integers(0, 65536, (H, W)).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    rgb = np.asarray(open_image(tmp_path / "g16.png"))
    assert rgb.shape == (H, W, 3) and np.abs(rgb[..., 0].astype(int) - grey / 257.0).max() <= 0.5
    assert rgb.std() > 10  # not all white


def test_mask_in_the_alpha_channel_is_read_from_it(tmp_path):
    la = np.zeros((H, W, 2), np.uint8)
    la[..., 0] = 255  # constant grey
    la[5:15, 8:30, 1] = 255  # the region is where it is opaque
    Image.fromarray(la, "LA").save(tmp_path / "cutout.png")
    assert np.array_equal(open_mask(tmp_path / "cutout.png"), la[..., 1] / 255.0)
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = _textured()
    rgba[..., 3] = 255
    with pytest.raises(ValueError, match="RGBA.*alpha channel"):
        region_mask(Image.fromarray(rgba, "RGBA"), H, W)  # opaque colour image: no single channel to use


def test_unusable_image_files(tmp_path):
    Image.fromarray(_textured()).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cannot read image"):
        open_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="is a directory"):
        open_image(tmp_path)


def test_max_pixels_guard_and_override(tmp_path, monkeypatch):
    Image.fromarray(_textured(40, 50)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"50x40 = 2,000 pixels, above the limit of 1,999"):
        RegionProcessor(32, max_pixels=1999)(str(tmp_path / "big.png"))
    monkeypatch.setenv("ALPHACLIP_MAX_PIXELS", "1000")
    with pytest.raises(ImageError, match="ALPHACLIP_MAX_PIXELS"):
        RegionProcessor(32)(_textured(40, 50))
    assert RegionProcessor(32, max_pixels=2000)(_textured(40, 50)).pixel_values.shape == (1, 3, 32, 32)


def test_pad_geometry_never_builds_the_padded_square():
    t = torch.rand(3, 1, 30000)
    calls = []
    real = F.pad

    def spy(x, pad, *args, **kwargs):
        out = real(x, pad, *args, **kwargs)
        calls.append(out.numel())
        return out

    try:
        F.pad = spy
        out = pad_resize(t, 224, "bicubic")
    finally:
        F.pad = real
    assert out.shape == (3, 224, 224) and max(calls) < 30000 * 30000 // 100
    small = torch.rand(3, 7, 500)
    ref = F.interpolate(F.pad(small, (0, 0, 246, 247))[None], size=(32, 32), mode="bicubic", antialias=True)[0]
    assert torch.equal(pad_resize(small, 32, "bicubic"), ref)


def test_labels_as_a_string_and_bad_templates_are_refused(tiny_model):
    with pytest.raises(ValueError, match="not one string"):
        text_classifier(tiny_model, "red circle")
    for templates in (["a photo"], ["{} and {}"], "bogus"):
        with pytest.raises(ValueError, match="template|prompt set"):
            text_classifier(tiny_model, ["cat"], templates)


# --- weights and configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "inf", "int", "bool"])
def test_non_float_or_non_finite_weights_are_refused_with_their_name(tmp_path, bad):
    sd = {k: v.clone() for k, v in create_model("tiny").state_dict().items()}
    key = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    sd[key] = {"nan": sd[key].index_fill(0, torch.tensor([3]), float("nan")),
               "inf": sd[key].index_fill(0, torch.tensor([3]), float("inf")),
               "int": sd[key].long(), "bool": sd[key] > 0}[bad]
    save_safetensors(sd, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        create_model("tiny", pretrained=tmp_path / "w.safetensors")


def test_shard_index_outside_its_folder_and_fifo_are_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="file name inside"):
        read_state_dict(tmp_path / "hf")
    os.mkfifo(tmp_path / "pipe.pth")
    with pytest.raises(CheckpointError, match="FIFO"):
        read_state_dict(tmp_path / "pipe.pth")


def test_config_sizes_are_checked_before_the_model_is_built(tmp_path):
    good = get_config("tiny").to_dict()
    for section, field, value in [("vision", "width", 10 ** 7), ("vision", "layers", 0), ("text", "heads", 3),
                                  ("vision", "patch_size", 64)]:
        d = json.loads(json.dumps(good))
        d[section][field] = value
        with pytest.raises(ValueError, match=f"{section}_"):
            CLIPConfig.from_dict(d)
    save_pretrained(create_model("tiny"), tmp_path / "m")
    cfg_file = tmp_path / "m" / "alphaclip_config.json"
    d = json.loads(cfg_file.read_text())
    d["config"]["vision"]["mlp_dim"] = 10 ** 9
    cfg_file.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="vision_mlp_dim"):
        from_pretrained(tmp_path / "m")
    with pytest.raises(TypeError, match="vision_widht"):
        create_model("tiny", vision_widht=96)


# --- outputs ---------------------------------------------------------------------------------------------


def test_save_pretrained_refuses_to_overwrite_and_replaces_whole(tmp_path):
    model = create_model("tiny", seed=1)
    save_pretrained(model, tmp_path / "out")
    (tmp_path / "out" / "stale.bin").write_bytes(b"from an earlier export")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(model, tmp_path / "out")
    save_pretrained(create_model("tiny", seed=2), tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alphaclip_config.json", "model.safetensors"]
    assert torch.equal(from_pretrained(tmp_path / "out").visual.proj, create_model("tiny", seed=2).visual.proj)
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        save_pretrained(model, tmp_path / "unrelated", overwrite=True)
    assert (tmp_path / "unrelated" / "notes.txt").read_text() == "mine"


def test_failed_directory_write_leaves_the_old_one_untouched(tmp_path):
    save_pretrained(create_model("tiny", seed=1), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(tmp_path / "out", overwrite=True, marker="alphaclip_config.json") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def test_hf_export_into_a_used_directory_needs_overwrite_and_leaves_no_stale_files(tmp_path):
    pytest.importorskip("transformers")
    import alphaclip_plugins.integrations.hf as ahf

    ahf.export_hf(create_model("tiny", seed=1), tmp_path / "hf")
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"an earlier export's weights")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ahf.export_hf(create_model("tiny", seed=2), tmp_path / "hf")
    ahf.export_hf(create_model("tiny", seed=2), tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "pytorch_model.bin").exists() and (tmp_path / "hf" / "config.json").exists()


def test_train_config_refuses_non_positive_sizes_and_unknown_override_keys():
    from alphaclip_plugins.train.config import load_config

    for item, match in (("steps=-5", "steps must be at least 1"), ("batch_size=0", "batch_size must be at least 1"),
                        ("model.overrides={vision_widht: 96}", "vision_widht")):
        with pytest.raises(ValueError, match=match):
            load_config(None, [item])
    assert load_config(None, ["model.overrides={vision_width: 96}"]).model.overrides == {"vision_width": 96}
