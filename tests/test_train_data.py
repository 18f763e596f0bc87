"""Training data: JSONL, COCO-style and tar-shard loaders, the shard split, resume positions, bad samples."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from alphaclip_plugins.core.alpha import ALPHA_FOREGROUND
from alphaclip_plugins.core.processor import RegionProcessor
from alphaclip_plugins.train.config import load_config
from alphaclip_plugins.train.data import DataError, SampleDecoder, read_coco, read_jsonl
from alphaclip_plugins.train.loader import DataHealth, DataState
from alphaclip_plugins.train.shards import expand_shards
from alphaclip_plugins.train.streams import MapStream, ShardStream
from alphaclip_plugins.train.synthetic import SyntheticConfig, iter_samples, write_jsonl, write_shards
from train_utils import TINY_SHAPES_DATA

SIZE = 32


def _decoder() -> SampleDecoder:
    return SampleDecoder(RegionProcessor(SIZE))


def _take(stream, n: int, num_workers: int = 0):
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_jsonl_every_region_form_gives_the_drawn_mask(tmp_path):
    cfg = SyntheticConfig(num_images=6, region_format="mixed", seed=5, **TINY_SHAPES_DATA)
    manifest = write_jsonl(tmp_path, cfg)
    records = read_jsonl(manifest)
    truth = [(img.masks[k], s) for _, img, samples in iter_samples(cfg) for k, s in enumerate(samples)]
    assert len(records) == len(truth) == 18
    kinds = set()
    for rec, (mask, sample) in zip(records, truth):
        pixels, alpha, caption = _decoder()(rec, whole=False)
        assert pixels.shape == (3, SIZE, SIZE) and alpha.shape == (1, SIZE, SIZE)
        assert caption == sample["caption"]
        fg = (alpha[0] > 0).numpy()
        kind = next(iter(sample["region"]))
        kinds.add(kind)
        if kind in ("rle", "mask"):
            assert np.array_equal(fg, mask.astype(bool)), kind
        elif kind == "polygon":
            assert _iou(fg, mask.astype(bool)) > 0.75
        else:  # a box covers its shape
            assert fg[mask.astype(bool)].all() and fg.sum() >= mask.sum()
    assert kinds == {"rle", "polygon", "box", "mask"}


def test_whole_image_samples_use_the_image_caption(tmp_path):
    manifest = write_jsonl(tmp_path, SyntheticConfig(num_images=4, **TINY_SHAPES_DATA))
    records = read_jsonl(manifest)
    batch = MapStream(records, _decoder(), batch_size=12, whole_image_ratio=1.0, shuffle=False).batch(0)
    assert torch.all(batch["alpha"] == ALPHA_FOREGROUND)
    assert batch["captions"] == [r.image_caption for r in records[:12]]
    batch = MapStream(records, _decoder(), batch_size=12, whole_image_ratio=0.0, shuffle=False).batch(0)
    assert batch["captions"] == [r.caption for r in records[:12]]
    assert all((a < 0).any() for a in batch["alpha"])


def _coco_file(tmp_path: Path) -> Path:
    cfg = SyntheticConfig(num_images=2, seed=2, **TINY_SHAPES_DATA)
    images, anns = [], []
    for i, img, samples in iter_samples(cfg):
        img.image.save(tmp_path / f"{i}.png")
        images.append({"id": 10 + i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE, "caption": img.caption})
        for k, (shape, sample) in enumerate(zip(img.shapes, samples)):
            x0, y0, x1, y1 = shape.box
            ann = {"id": 100 * i + k, "image_id": 10 + i, "bbox": [x0, y0, x1 - x0, y1 - y0]}
            if k == 0:
                ann["segmentation"] = [shape.polygon]
                ann["sentences"] = [{"sent": sample["label"]}, {"sent": "the " + sample["label"]}]  # RefCOCO style
            elif k == 1:
                ann["segmentation"] = sample["region"]["rle"]
                ann["caption"] = sample["label"]
            else:
                ann["expression"] = sample["label"]  # bbox only
            anns.append(ann)
    anns.append({"id": 999, "image_id": 77, "bbox": [0, 0, 4, 4], "caption": "orphan"})  # unknown image
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def test_coco_style_referring_expressions(tmp_path):
    records = read_coco(_coco_file(tmp_path))
    good = [r for r in records if r.error is None]
    assert len(good) == 2 * 4  # per image: 2 sentences + 1 caption + 1 expression
    assert [r for r in records if r.error] and "image_id 77" in [r for r in records if r.error][0].error
    by_kind = {type(r.region).__name__ + next(iter(r.region)): r for r in good}
    assert set(by_kind) == {"dictpolygon", "dictrle", "dictbox"}
    box_rec = by_kind["dictbox"]
    x0, y0, x1, y1 = box_rec.region["box"]
    _, alpha, caption = _decoder()(box_rec, whole=False)
    fg = alpha[0] > 0
    assert fg.sum() == (x1 - x0) * (y1 - y0) and fg[int(y0), int(x0)] and caption == box_rec.caption
    _, alpha, caption = _decoder()(box_rec, whole=True)
    assert torch.all(alpha == ALPHA_FOREGROUND) and caption.startswith("a ") and " and " in caption
    assert len(read_coco(tmp_path / "refs.json", region="bbox")) == len(records)


def test_tar_shards_hold_the_same_samples_as_jsonl(tmp_path):
    cfg = SyntheticConfig(num_images=8, region_format="mixed", **TINY_SHAPES_DATA)
    records = read_jsonl(write_jsonl(tmp_path / "j", cfg))
    shards = write_shards(tmp_path / "t", cfg, samples_per_shard=5)
    assert len(shards) == 5 and expand_shards(str(tmp_path / "t")) == [str(s) for s in shards]
    (batch,) = _take(ShardStream(expand_shards(str(tmp_path / "t")), _decoder(), 24, shuffle_buffer=1), 1)
    ref = MapStream(records, _decoder(), 24, shuffle=False).batch(0)

    def keyed(b):
        rows = zip(b["captions"], b["alpha"], b["pixel_values"])
        return sorted((c, a.sum().item(), p.sum().item()) for c, a, p in rows)

    for (c1, a1, p1), (c2, a2, p2) in zip(keyed(batch), keyed(ref)):
        assert c1 == c2 and a1 == pytest.approx(a2, abs=1e-3) and p1 == pytest.approx(p2, abs=1e-3)


def test_shards_split_across_ranks_and_workers_without_overlap(tmp_path):
    cfg = SyntheticConfig(num_images=8, **TINY_SHAPES_DATA)
    shards = [str(s) for s in write_shards(tmp_path, cfg, samples_per_shard=3)]  # 8 shards of 3
    seen, owners = {}, {}
    for rank in range(2):
        stream = ShardStream(shards, _decoder(), 3, rank=rank, world_size=2, num_workers=2, shuffle_buffer=1)
        for role in range(2):
            for s in stream.stream_shards(role):
                assert s not in owners, f"{s} read by {owners[s]} and {(rank, role)}"
                owners[s] = (rank, role)
        seen[rank] = _take(stream, 4, num_workers=2)  # one pass over each worker's two shards
    assert sorted(owners) == sorted(shards)
    names = {r: [n for b in batches for n in b["names"]] for r, batches in seen.items()}
    assert len(set(names[0])) == len(names[0]) == 12 and not set(names[0]) & set(names[1])
    for rank, batches in seen.items():
        for b in batches:  # each batch comes from the shards of the worker (role) that made it
            assert {n.rsplit(":", 1)[0] for n in b["names"]} <= {s for s, o in owners.items() if o == (rank, b["role"])}


@pytest.mark.parametrize("kind", ["jsonl", "tar"])
def test_resumed_stream_continues_exactly(tmp_path, kind):
    cfg = SyntheticConfig(num_images=10, **TINY_SHAPES_DATA)
    workers = 2 if kind == "tar" else 0

    def stream(state: DataState):
        if kind == "jsonl":
            return MapStream(read_jsonl(write_jsonl(tmp_path, cfg)), _decoder(), 4, seed=3, whole_image_ratio=0.3,
                             start=state.batches)
        return ShardStream(expand_shards(str(tmp_path)), _decoder(), 4, num_workers=2, seed=3, whole_image_ratio=0.3,
                           start=state.batches, positions=state.positions or None, shuffle_buffer=4)

    if kind == "tar":
        write_shards(tmp_path, cfg, samples_per_shard=7)
    full = _take(stream(DataState()), 9, workers)
    state = DataState()
    for b in full[:5]:
        state.advance(b)
    resumed = _take(stream(DataState.from_state(state.state_dict())), 4, workers)
    for a, b in zip(full[5:], resumed):
        assert a["names"] == b["names"] and a["captions"] == b["captions"]
        assert torch.equal(a["alpha"], b["alpha"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def _corrupt_manifest(tmp_path: Path) -> Path:
    manifest = write_jsonl(tmp_path, SyntheticConfig(num_images=5, **TINY_SHAPES_DATA))
    lines = manifest.read_text().splitlines()
    (tmp_path / "images" / "000001.png").unlink()  # missing: 3 samples
    (tmp_path / "images" / "000002.png").write_bytes(b"not a png")  # corrupt: 3 samples
    d = json.loads(lines[12])
    d["region"] = {"rle": {"size": [SIZE, SIZE], "counts": "garbage!!"}}  # bad RLE
    lines[12] = json.dumps(d)
    lines.append("{not json")  # malformed line
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    records = read_jsonl(_corrupt_manifest(tmp_path))
    stream = MapStream(records, _decoder(), batch_size=len(records), shuffle=False)
    batch = stream.batch(0)
    assert batch["pixel_values"].shape[0] == len(records) == 16  # bad ones replaced by readable ones
    bad_names = {n for n, _ in batch["bad"]}
    assert bad_names == {f"samples.jsonl:{n}" for n in (4, 5, 6, 7, 8, 9, 13, 16)}
    reasons = " ".join(r for _, r in batch["bad"])
    assert "cannot read" in reasons and "cannot decode" in reasons and "RLE" in reasons and "manifest line" in reasons
    assert not set(batch["names"]) & bad_names
    health = DataHealth(max_bad_fraction=0.9)
    for _ in range(10):
        health.update(batch)
    assert health.bad == 10 * len(batch["bad"]) and health.tried == 10 * batch["tried"]
    strict = DataHealth(max_bad_fraction=0.05)
    with pytest.raises(DataError, match="could not be read") as err:
        for _ in range(10):
            strict.update(batch)
    assert "samples.jsonl:4" in str(err.value) and "max_bad_fraction" in str(err.value)


def test_corrupt_tar_members_and_truncated_shards_are_skipped(tmp_path):
    shards = write_shards(tmp_path, SyntheticConfig(num_images=4, **TINY_SHAPES_DATA), samples_per_shard=6)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated mid-shard
    with tarfile.open(shards[0], "a") as tar:  # a sample whose image is garbage
        for name, payload in (("zzz.png", b"garbage"), ("zzz.json", json.dumps({"caption": "x"}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    batches = _take(ShardStream([str(s) for s in shards], _decoder(), 8, shuffle_buffer=1), 3)  # > one pass
    reasons = [r for b in batches for _, r in b["bad"]]
    assert any("cannot decode image" in r for r in reasons)
    assert any("cannot read shard" in r and shards[1].name in r for r in reasons)
    assert all(b["pixel_values"].shape[0] == 8 and b["tried"] == 8 + len(b["bad"]) for b in batches)


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: tiny\noptim:\n  lr: 1e-4\nsteps: 10\n")
    cfg = load_config(path, ["optim.lr=3e-3", "data.num_workers=0", "resume=false", "optim.betas=[0.8, 0.9]"])
    assert cfg.model.name == "tiny" and cfg.optim.lr == 3e-3 and cfg.steps == 10 and cfg.resume is False
    assert cfg.optim.betas == [0.8, 0.9] and cfg.data.num_workers == 0 and cfg.optim.lr_ratio == 0.01
    assert load_config(path).optim.lr == 1e-4  # YAML's "1e-4" is a string; the float field reads it
    with pytest.raises(ValueError, match="unknown config keys.*lrr"):
        load_config(path, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="precision must be one of"):
        load_config(path, ["precision=fp8"])
    with pytest.raises(ValueError, match="not key=value"):
        load_config(path, ["steps"])
    with pytest.raises(ValueError, match="not divisible"):
        load_config(path, ["batch_size=10"]).micro_batch(world_size=4)


def test_cli_prints_the_resolved_config_and_rejects_bad_keys(tmp_path, capsys):
    from alphaclip_plugins.train.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: tiny\n")
    assert main([str(path), "optim.lr=2e-3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "name: tiny" in out and "lr: 0.002" in out and "label_smoothing: 0.1" in out
    assert main([str(path), "optim.nope=1"]) == 2
    assert "unknown config keys ['nope']" in capsys.readouterr().err
