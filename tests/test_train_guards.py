"""The trainer's guards: a reused output_dir, skipped-sample listings, empty masks, truncated shards, eval on the
console, single metric rows after a resume, and config values refused when read."""
from __future__ import annotations

import json
import signal
import tarfile
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

from alphaclip_plugins.core.io import read_state_dict
from alphaclip_plugins.core.processor import RegionProcessor
from alphaclip_plugins.train.checkpointing import Checkpointer
from alphaclip_plugins.train.cli import main
from alphaclip_plugins.train.data import SampleDecoder, SampleError, read_jsonl
from alphaclip_plugins.train.shards import read_shard
from alphaclip_plugins.train.synthetic import SyntheticConfig, write_jsonl, write_shards
from train_utils import TINY_SHAPES_DATA, run_train, tiny_config, write_config

SIZE = 32  # TINY_SHAPES_DATA's image size


def _manifest(directory: Path, num_images: int = 6, seed: int = 0) -> Path:
    return write_jsonl(directory, SyntheticConfig(num_images=num_images, seed=seed, **TINY_SHAPES_DATA))


def _cli(capsys, *argv: str):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _steps(run: Path) -> List[int]:
    return [int(p.name.split("_")[1]) for p in Checkpointer(run / "checkpoints").checkpoints()]


def _rows(path: Path, group: str = "train") -> List[int]:
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if r.get("group", group) == group]


def test_reused_output_dir_with_another_config_is_refused_unless_told(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, str(_manifest(tmp_path / "data")), steps=3))
    run = tmp_path / "run"
    assert _cli(capsys, str(cfg))[0] == 0
    first = read_state_dict(run / "final")
    (run / "notes.txt").write_text("mine")  # not a file of the run: nothing may remove it

    rc, _, err = _cli(capsys, str(cfg), "steps=5", "optim.lr=0.5")  # the run of the issue: silently resumed before
    assert rc == 2 and "different config" in err and "optim.lr: 0.001 -> 0.5" in err and "steps: 3 -> 5" in err
    assert "resume=true" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert _steps(run) == [3] and json.loads((run / "config.json").read_text())["steps"] == 3  # untouched
    rc, _, err = _cli(capsys, str(cfg), "resume=false")  # a new run over the old one's checkpoints
    assert rc == 2 and "earlier run" in err and "--overwrite" in err
    rc, _, err = _cli(capsys, str(cfg), "--overwrite", "resume=true")
    assert rc == 2 and "cannot also resume" in err

    # The same config (reporting settings aside) continues the finished run: nothing trains, nothing is logged twice.
    assert _cli(capsys, str(cfg), "log_every=2", "progress=true")[0] == 0
    assert _rows(run / "metrics.jsonl") == [1, 2, 3]
    assert all(torch.equal(first[k], v) for k, v in read_state_dict(run / "final").items())

    assert _cli(capsys, str(cfg), "steps=5", "resume=true")[0] == 0  # told: continues with the new settings
    assert _steps(run) == [3, 5] and _rows(run / "metrics.jsonl") == [1, 2, 3, 4, 5]
    assert json.loads((run / "config.json").read_text())["steps"] == 5

    assert _cli(capsys, str(cfg), "optim.lr=0.5", "--overwrite")[0] == 0  # told: starts over
    assert _steps(run) == [3] and _rows(run / "metrics.jsonl") == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.5
    again = read_state_dict(run / "final")
    assert not torch.equal(first["visual.conv1_alpha.weight"], again["visual.conv1_alpha.weight"])
    assert (run / "notes.txt").read_text() == "mine"


def _bad_manifest(directory: Path) -> Path:
    """A manifest whose samples 0-5 are readable and whose last five cannot be read, each for its own reason."""
    manifest = _manifest(directory, num_images=2)
    good = manifest.read_text().splitlines()
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(directory / "empty.png")
    image = json.loads(good[0])["image"]
    bad = [{"image": image, "caption": "an empty mask", "region": {"mask": "empty.png"}},
           {"image": image, "caption": "an empty rle", "region": {"rle": {"size": [SIZE, SIZE], "counts": [SIZE * SIZE]}}},
           {"image": image, "caption": "a polygon outside", "region": {"polygon": [40, 40, 50, 40, 45, 50]}},
           {"image": "images/missing.png", "caption": "a missing image", "region": None}]
    manifest.write_text("\n".join(good + [json.dumps(b) for b in bad] + ["{not json"]) + "\n")
    return manifest


def test_empty_masks_are_skipped_samples_with_their_reason(tmp_path):
    records = read_jsonl(_bad_manifest(tmp_path))
    decoder = SampleDecoder(RegionProcessor(SIZE))
    reasons = {"an empty mask": "region 0 is empty", "an empty rle": "region 0 is empty",
               "a polygon outside": "outside the 32x32 image"}
    empty = [r for r in records if r.caption in reasons]
    assert len(empty) == 3
    for rec in empty:
        for whole in (False, True):  # no image caption: a whole-image draw keeps the region
            with pytest.raises(SampleError, match=reasons[rec.caption]):
                decoder(rec, whole)
    pixels, alpha, _ = decoder(records[0], False)  # a readable sample of the same image decodes
    assert alpha.min() < alpha.max() and pixels.shape == (3, SIZE, SIZE)


def test_the_end_of_run_report_lists_skipped_samples(tmp_path, capsys):
    cfg = tiny_config(tmp_path, str(_bad_manifest(tmp_path / "data")), steps=3, **{"data.max_bad_fraction": 0.9})
    rc, out, err = _cli(capsys, str(write_config(tmp_path / "c.yaml", cfg)))
    assert rc == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    names = {r["name"] for r in rows}
    assert names <= {f"samples.jsonl:{n}" for n in range(7, 12)} and len(names) >= 3
    assert all(r["reason"] for r in rows) and {r["step"] for r in rows} == {1, 2, 3}  # the step that met each
    counts = out.split("done: 3 steps; ")[1].split(" samples skipped")[0]  # "N of M"
    assert int(counts.split(" of ")[0]) == len(rows) and f"all listed in {tmp_path / 'run' / 'skipped.jsonl'}" in out
    first = rows[: min(len(rows), 10)]
    for r in first:  # the first ones, with their reasons, on the console
        assert f"  {r['name']}: {r['reason']}" in out
    empty = [r for r in rows if r["name"] in {"samples.jsonl:7", "samples.jsonl:8"}]
    assert empty and all("region 0 is empty" in r["reason"] for r in empty)


def test_a_truncated_shard_says_how_many_samples_it_lost(tmp_path):
    (shard,) = write_shards(tmp_path, SyntheticConfig(num_images=2, **TINY_SHAPES_DATA), samples_per_shard=8)
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    assert len(keys) == 6  # 3 shapes per image
    data = shard.read_bytes()
    fourth = next(m for m in members if m.name.startswith(keys[3]))
    cuts = {"mid-member": fourth.offset_data + fourth.size // 2,  # inside sample 4's first member
            "at a header": fourth.offset}  # right after sample 3's last member: no end-of-archive marker
    for what, cut in cuts.items():
        shard.write_bytes(data[:cut])
        got: List[str] = []
        with pytest.raises(SampleError) as err:
            for name, _ in read_shard(str(shard)):
                got.append(name)
        message = str(err.value)
        assert f"{len(got)} samples were read" in message, (what, message)
        assert got == [f"{shard}:{k}" for k in keys[: len(got)]] and len(got) in (3, 4)
        assert "lost" in message and str(shard) in message


@pytest.mark.slow
def test_a_resumed_run_logs_every_step_once_and_prints_eval(tmp_path):
    manifest = _bad_manifest(tmp_path / "data")
    evals = _manifest(tmp_path / "eval", num_images=3, seed=1)
    over = {"steps": 6, "save_every": 2, "eval_every": 2, "data.eval": str(evals), "data.max_bad_fraction": 0.9}
    full = tiny_config(tmp_path / "full", str(manifest), **over)
    cut = tiny_config(tmp_path / "cut", str(manifest), **over)
    proc = run_train(write_config(tmp_path / "full.yaml", full))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "full" / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in (r for r in lines if r["group"] == "eval"):  # eval results reach the console
        assert f"eval at step {row['step']}: region_top1 {row['region_top1']:.4g}" in proc.stdout

    run = tmp_path / "cut" / "run"
    proc = run_train(write_config(tmp_path / "cut.yaml", cut), fault="save:2")  # dies writing step 4's checkpoint
    assert proc.returncode == -signal.SIGKILL
    assert _rows(run / "metrics.jsonl") == [1, 2, 3, 4] and max(_rows(run / "skipped.jsonl")) == 4
    proc = run_train(tmp_path / "cut.yaml")  # resumes at step 2
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rows(run / "metrics.jsonl") == [1, 2, 3, 4, 5, 6] and _rows(run / "metrics.jsonl", "eval") == [2, 4, 6]
    # the resumed run's logs are the uninterrupted run's: the same losses, the same skipped samples
    strip = lambda path: [{k: v for k, v in r.items() if k != "samples_per_s"}  # noqa: E731
                          for r in map(json.loads, path.read_text().splitlines())]
    assert strip(run / "metrics.jsonl") == strip(tmp_path / "full" / "run" / "metrics.jsonl")
    assert strip(run / "skipped.jsonl") == strip(tmp_path / "full" / "run" / "skipped.jsonl")


def test_non_positive_sizes_and_misspelt_override_keys_are_refused_when_read(capsys):
    for item, match in (("steps=-5", "steps must be at least 1; got -5"),
                        ("batch_size=0", "batch_size must be at least 1; got 0"),
                        ("model.overrides={vision_widht: 96}", "vision_widht")):
        rc, _, err = _cli(capsys, item)
        assert rc == 2 and match in err and "divisible" not in err, err
