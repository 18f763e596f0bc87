"""Region conversations: the sample format, bad samples, converters (RefCOCO pickles read safely, Visual Genome,
the trainer's COCO-style files) and their CLI. Every input file is built here."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from alphaclip_plugins.core.regions import region_mask
from alphaclip_plugins.train.mllm_convert import (
    from_records,
    from_refcoco,
    from_visual_genome,
    load_refs,
    main,
    safe_pickle_load,
)
from alphaclip_plugins.train.data import read_coco
from alphaclip_plugins.train.mllm_data import (
    BadSample,
    ConversationDataset,
    ConversationSample,
    check_conversations,
    read_conversations,
)

H, W = 30, 44  # non-square


def _image(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


def _conv(question="<image>\nWhat is in the region?", answer="a red circle"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def folder(tmp_path):
    _image(tmp_path / "a.png")
    mask = np.zeros((H, W), np.uint8)
    mask[5:15, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "empty.png")
    return tmp_path


def test_every_region_form_reads_and_matches_the_core_mask(folder):
    rle = {"size": [H, W], "counts": [W * 4, 6, H * W - W * 4 - 6]}
    forms = {
        "mask": ({"mask": "m.png"}, None),
        "rle": ({"rle": rle}, rle),
        "bare rle": (rle, rle),
        "polygon": ({"polygon": [2, 3, 20, 3, 20, 25, 2, 25]}, {"polygon": [2, 3, 20, 3, 20, 25, 2, 25]}),
        "box": ({"box": [4, 5, 30, 20]}, (4, 5, 30, 20)),
        "bare box": ([4, 5, 30, 20], (4, 5, 30, 20)),
        "bbox": ({"bbox": [4, 5, 26, 15]}, (4, 5, 30, 20)),
        "null": (None, None),
    }
    lines = [{"image": "a.png", "region": region, "conversations": _conv()} for region, _ in forms.values()]
    lines.append({"image": "a.png", "conversations": _conv()})  # region absent
    (folder / "s.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    dataset = ConversationDataset.from_file(folder / "s.jsonl")
    items = [dataset[i] for i in range(len(dataset))]
    assert all(isinstance(it, ConversationSample) for it in items), [getattr(it, "reason", "") for it in items]
    assert items[0].region.shape == (H, W) and items[0].region[5:15, 10:30].all() and items[0].region.sum() == 200
    for item, (name, (_, core)) in zip(items[1:], list(forms.items())[1:]):
        expected = region_mask(core, H, W)
        assert (item.region is None) == (expected is None), name
        if expected is not None:
            assert np.array_equal(item.region, expected), name
    assert items[-1].region is None and items[0].image.size == (W, H)
    assert items[0].turns == [("human", "<image>\nWhat is in the region?"), ("gpt", "a red circle")]
    as_list = read_conversations(_write(folder / "s.json", lines))  # a JSON list reads the same
    assert [r.region for r in as_list] == [r.region for r in dataset.records]


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_bad_samples_are_skipped_counted_and_listed_with_reasons(folder):
    good = {"image": "a.png", "region": [1, 1, 20, 20], "conversations": _conv()}
    bad = {
        "missing image": {"image": "nope.png", "conversations": _conv()},
        "box outside": {"image": "a.png", "region": [1, 1, 200, 20], "conversations": _conv()},
        "empty mask": {"image": "a.png", "region": {"mask": "empty.png"}, "conversations": _conv()},
        "no <image>": {"image": "a.png", "conversations": _conv(question="What is it?")},
        "two <image>": {"image": "a.png", "conversations": _conv(question="<image> <image> What?")},
        "wrong roles": {"image": "a.png", "conversations": [{"from": "gpt", "value": "<image> hi"},
                                                            {"from": "human", "value": "x"}]},
        "ends with human": {"image": "a.png", "conversations": _conv() + [{"from": "human", "value": "and?"}]},
        "unknown region": {"image": "a.png", "region": {"circle": 3, "r": 2}, "conversations": _conv()},
        "bad rle": {"image": "a.png", "region": {"rle": {"size": [H, W], "counts": [5, 5]}}, "conversations": _conv()},
    }
    lines = [json.dumps(good)] + [json.dumps(v) for v in bad.values()] + ["{not json"]
    (folder / "s.jsonl").write_text("\n".join(lines) + "\n")
    report = check_conversations(ConversationDataset.from_file(folder / "s.jsonl"))
    assert report["tried"] == len(bad) + 2
    names = [n for n, _ in report["bad"]]
    assert names == [f"s.jsonl:{i}" for i in range(2, len(bad) + 3)]  # every bad one, listed by line, good kept
    reasons = dict(zip(list(bad) + ["json"], [r for _, r in report["bad"]]))
    assert "No such file" in reasons["missing image"] and "outside" in reasons["box outside"]
    assert "covers no pixel" in reasons["empty mask"]
    assert "0 <image>" in reasons["no <image>"] and "2 <image>" in reasons["two <image>"]
    assert "alternate" in reasons["wrong roles"] and "ends with a human" in reasons["ends with human"]
    assert "unknown region" in reasons["unknown region"] and "RLE" in reasons["bad rle"]
    assert "bad JSON" in reasons["json"]
    assert main(["check", str(folder / "s.jsonl")]) == 1


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_refs_pickle_is_read_without_running_code(tmp_path):
    refs = [{"ref_id": 1, "ann_id": 10, "image_id": 5, "split": "train", "category_id": 1,
             "sentences": [{"sent_id": 0, "sent": "the man on the left", "tokens": ["the", "man"]}]}]
    for protocol in (0, 2, 4):
        assert safe_pickle_load(pickle.dumps(refs, protocol=protocol)) == refs
    hostile = pickle.dumps([{"ref_id": 1, "x": _Boom()}], protocol=2)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
            safe_pickle_load(hostile)
        (tmp_path / "refs(umd).p").write_bytes(hostile)
        with pytest.raises(pickle.UnpicklingError):
            load_refs(tmp_path / "refs(umd).p")
        with pytest.raises(pickle.UnpicklingError, match=r"__builtin__\.set|builtins\.set"):  # any global, even a harmless one
            safe_pickle_load(pickle.dumps({1, 2}, protocol=2))
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "pwned").exists()


def _instances():
    return {"images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "height": H, "width": W}],
            "annotations": [{"id": 10, "image_id": 5, "bbox": [2, 3, 10, 12],
                             "segmentation": [[2, 3, 12, 3, 12, 15, 2, 15]]},
                            {"id": 11, "image_id": 5, "bbox": [20, 3, 10, 12],
                             "segmentation": {"size": [H, W], "counts": [100, 20, H * W - 120]}}]}


def _refs():
    return [{"ref_id": 1, "ann_id": 10, "image_id": 5, "split": "train",
             "sentences": [{"sent_id": 7, "sent": "left man"}, {"sent_id": 8, "sent": "guy at left"}]},
            {"ref_id": 2, "ann_id": 11, "image_id": 5, "split": "val", "sentences": [{"sent_id": 9, "raw": "Cat."}]},
            {"ref_id": 3, "ann_id": 99, "image_id": 5, "split": "train", "sentences": [{"sent": "ghost"}]}]


def test_refcoco_converter_pickle_and_json_and_cli(tmp_path):
    samples, skipped = from_refcoco(_refs(), _instances(), image_dir="train2014", prefix="refcocog")
    assert [s["id"] for s in samples] == ["refcocog-1-7", "refcocog-1-8", "refcocog-2-9"]
    assert [s["conversations"][1]["value"] for s in samples] == ["left man", "guy at left", "Cat."]
    assert samples[0]["image"] == "train2014/COCO_train2014_000000000005.jpg"
    assert samples[0]["region"] == {"polygon": [[2, 3, 12, 3, 12, 15, 2, 15]]}
    assert samples[2]["region"] == {"rle": _instances()["annotations"][1]["segmentation"]}
    assert skipped == [("ref 3", "ann_id 99 is not in instances.json")]
    train, _ = from_refcoco(_refs(), _instances(), split="train", region="box")
    assert len(train) == 2 and train[0]["region"] == {"box": [2.0, 3.0, 12.0, 15.0]}
    (tmp_path / "train2014").mkdir()
    _image(tmp_path / "train2014" / "COCO_train2014_000000000005.jpg")
    _write(tmp_path / "instances.json", _instances())
    (tmp_path / "refs(umd).p").write_bytes(pickle.dumps(_refs(), protocol=2))
    _write(tmp_path / "refs.json", _refs())
    outputs = []
    for refs in ("refs(umd).p", "refs.json"):
        out = tmp_path / f"{refs}.jsonl"
        assert main(["refcoco", "--refs", str(tmp_path / refs), "--instances", str(tmp_path / "instances.json"),
                     "--image-dir", "train2014", "-o", str(out)]) == 0
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 3
    dataset = ConversationDataset.from_file(tmp_path / "refs.json.jsonl")
    items = [dataset[i] for i in range(len(dataset))]
    assert all(isinstance(i, ConversationSample) for i in items)
    assert np.array_equal(items[0].region, region_mask({"polygon": [[2, 3, 12, 3, 12, 15, 2, 15]]}, H, W))


def test_visual_genome_converter(tmp_path):
    vg = [{"id": 7, "regions": [
        {"region_id": 1, "image_id": 7, "x": 3, "y": 4, "width": 10, "height": 8, "phrase": " a white cup "},
        {"region_id": 2, "image_id": 7, "x": 3, "y": 4, "width": 0, "height": 8, "phrase": "flat"},
        {"region_id": 3, "image_id": 7, "x": 3, "y": 4, "width": 5, "height": 5, "phrase": ""},
        {"region_id": 4, "image_id": 7, "x": 30, "y": 20, "width": 40, "height": 40, "phrase": "too big"}]}]
    samples, skipped = from_visual_genome(vg, prompt="What is this?", image_dir="VG_100K")
    assert [s["region"] for s in samples] == [{"box": [3.0, 4.0, 13.0, 12.0]}, {"box": [30.0, 20.0, 70.0, 60.0]}]
    assert samples[0]["conversations"] == [{"from": "human", "value": "<image>\nWhat is this?"},
                                           {"from": "gpt", "value": "a white cup"}]
    assert samples[0]["image"] == "VG_100K/7.jpg" and samples[0]["id"] == "vg-7-1"
    assert [n for n, _ in skipped] == ["image 7 region 2", "image 7 region 3"]
    (tmp_path / "VG_100K").mkdir()
    _image(tmp_path / "VG_100K" / "7.jpg")
    _write(tmp_path / "region_descriptions.json", vg)
    assert main(["vg", "--regions", str(tmp_path / "region_descriptions.json"), "--image-dir", "VG_100K",
                 "-o", str(tmp_path / "vg.jsonl")]) == 0
    report = check_conversations(ConversationDataset.from_file(tmp_path / "vg.jsonl"))
    assert report["tried"] == 2 and len(report["bad"]) == 1 and "outside" in report["bad"][0][1]  # box past the image


def test_trainer_coco_referring_file_converts(tmp_path):
    (tmp_path / "data").mkdir()
    _image(tmp_path / "data" / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"id": 3, "image_id": 1, "bbox": [1, 2, 10, 10], "expressions": ["cup", "white cup"]},
                            {"id": 4, "image_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9]], "caption": "triangle"},
                            {"id": 5, "image_id": 2, "bbox": [0, 0, 1, 1], "caption": "lost"}]}
    path = _write(tmp_path / "data" / "ref.json", coco)
    samples, skipped = from_records(read_coco(path))
    assert [s["conversations"][1]["value"] for s in samples] == ["cup", "white cup", "triangle"]
    assert samples[0]["region"] == {"box": [1.0, 2.0, 11.0, 12.0]} and samples[2]["region"] == {"polygon": [[1, 1, 9, 1, 9, 9]]}
    assert len(skipped) == 1 and "image_id 2" in skipped[0][1]
    (tmp_path / "out").mkdir()
    assert main(["coco", str(path), "-o", str(tmp_path / "out" / "ref.jsonl")]) == 0  # paths relative to the output
    dataset = ConversationDataset.from_file(tmp_path / "out" / "ref.jsonl")
    assert len(dataset) == 3 and not any(isinstance(dataset[i], BadSample) for i in range(3))
