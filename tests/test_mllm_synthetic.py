"""Synthetic region conversations: the package's conversation format, every region form, seeds apart, written once."""
from __future__ import annotations

import json

import numpy as np

from alphaclip_plugins.train.mllm_data import ConversationDataset, ConversationSample
from alphaclip_plugins.train.mllm_synthetic import QUESTIONS, ConversationConfig, ensure_conversations
from alphaclip_plugins.train.synthetic import COLOURS, labels


def test_conversations_name_the_region_in_every_region_form(tmp_path):
    path = tmp_path / "train" / "samples.jsonl"
    ensure_conversations(path, ConversationConfig(num_images=8, seed=0))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {next(iter(d["region"])) for d in lines} == {"mask", "rle", "polygon", "box"}
    assert len({d["id"] for d in lines}) == len(lines)
    dataset = ConversationDataset.from_file(path)
    names = {f"a {label}" for label in labels()}
    sizes = set()
    for i, d in enumerate(lines):
        sample = dataset[i]
        assert isinstance(sample, ConversationSample), sample
        (role, question), (_, answer) = sample.turns
        assert question.startswith("<image>\n") and question[len("<image>\n"):] in QUESTIONS
        assert answer in names
        sizes.add(sample.image.size)
        if "box" not in d["region"]:  # the region selects pixels of the named colour (a box takes in background)
            mean = np.asarray(sample.image)[sample.region > 0.5].astype(float).mean(0)
            nearest = min(COLOURS, key=lambda c: np.abs(mean - COLOURS[c]).sum())
            assert answer.split()[1] == nearest, (d, mean)
    assert len(sizes) > 2  # images of several sizes and aspect ratios
    answers_per_image = {}
    for d in lines:
        answers_per_image.setdefault(d["image"], []).append(d["conversations"][1]["value"])
    assert all(len(a) >= 2 and len(set(a)) == len(a) for a in answers_per_image.values())  # only the region tells


def test_seeds_give_other_scenes_and_data_is_written_once(tmp_path):
    a, b = tmp_path / "a" / "s.jsonl", tmp_path / "b" / "s.jsonl"
    ensure_conversations(a, ConversationConfig(num_images=4, seed=0))
    ensure_conversations(b, ConversationConfig(num_images=4, seed=1))
    assert (a.parent / "images" / "000000.png").read_bytes() != (b.parent / "images" / "000000.png").read_bytes()
    a.write_text("kept\n")
    ensure_conversations(a, ConversationConfig(num_images=4, seed=0))  # the stamp says it is there
    assert a.read_text() == "kept\n"
    ensure_conversations(a, ConversationConfig(num_images=5, seed=0))  # another config: written again
    assert a.read_text() != "kept\n"
