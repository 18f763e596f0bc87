"""Synthetic region conversations: free scenes of shapes, one question about one highlighted shape.

The images and regions are those of the contrastive trainer's synthetic data (:mod:`.synthetic` with a
:class:`~.synthetic.SceneConfig`: shapes anywhere in images of any aspect ratio, regions stored as mask
files, RLEs, polygons and boxes, mixed); each region becomes one sample of the conversation format
(:mod:`.mllm_data`)::

    {"id": "shapes-0-1", "image": "images/000000.png", "region": {"rle": {...}},
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the highlighted region?"},
                       {"from": "gpt", "value": "a red circle"}]}

The question is one of :data:`QUESTIONS`, drawn per sample; the answer names the selected shape. Each
image holds 2-5 shapes, so the whole image does not say which one is meant: only the region does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

from .synthetic import RegionFormat, SceneConfig, SyntheticConfig, write_jsonl

#: Paraphrases of the one question; the tiny model's vocabulary holds their words.
QUESTIONS = (
    "What is in the highlighted region?",
    "What is highlighted?",
    "What is this?",
    "Name the highlighted shape.",
    "Describe the highlighted region.",
    "What shape is in the highlighted region?",
)


@dataclass
class ConversationConfig:
    """What :func:`write_conversations` draws (a config file's ``data.synthetic`` of ``train-mllm``)."""

    num_images: int = 2000  # images; each gives one sample per shape (2-5)
    seed: int = 0  # image i is drawn from (seed, i): train and held-out sets use different seeds
    region_format: RegionFormat = "mixed"  # how regions are stored; "mixed" cycles mask file, RLE, polygon, box
    scene: SceneConfig = field(default_factory=SceneConfig)  # free scenes (train/scenes.py)
    questions: List[str] = field(default_factory=lambda: list(QUESTIONS))  # one is drawn per sample


def _scene_cfg(cfg: ConversationConfig) -> SyntheticConfig:
    return SyntheticConfig(num_images=cfg.num_images, seed=cfg.seed, region_format=cfg.region_format, canonical=True,
                           scene=cfg.scene)


def write_conversations(path: Union[str, Path], cfg: ConversationConfig) -> Path:
    """Write the images, mask files and the conversations JSONL ``path`` (image paths relative to its folder).

    The scenes' own manifest (``regions.jsonl``, the contrastive trainer's format) is written beside it.
    """
    path = Path(path)
    regions = write_jsonl(path.parent, _scene_cfg(cfg), manifest="regions.jsonl")
    rng = np.random.default_rng([cfg.seed, 1 << 20])  # questions: a stream apart from the scenes'
    lines, last, k = [], None, 0
    for line in regions.read_text().splitlines():
        d = json.loads(line)
        k = k + 1 if d["image"] == last else 0
        last = d["image"]
        question = cfg.questions[int(rng.integers(len(cfg.questions)))]
        lines.append(json.dumps({
            "id": f"shapes-{Path(d['image']).stem}-{k}", "image": d["image"], "region": d["region"],
            "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                              {"from": "gpt", "value": d["caption"]}],
        }))
    path.write_text("\n".join(lines) + "\n")
    return path


def fingerprint(cfg: ConversationConfig) -> str:
    """A short id of a config, to tell whether data on disk was written with it."""
    return hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def ensure_conversations(path: Optional[Union[str, Path]], cfg: Optional[ConversationConfig]) -> None:
    """Write synthetic conversations at ``path`` unless data of this config is there (a stamp file marks
    finished data, so an interrupted write is redone)."""
    if path is None or cfg is None:
        return
    path = Path(path)
    stamp = path.parent / f".conversations-{fingerprint(cfg)}"
    if stamp.exists() and path.exists():
        return
    write_conversations(path, cfg)
    stamp.touch()


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m alphaclip_plugins.train.mllm_synthetic OUT.jsonl [--num-images N] [--seed S]``: e.g. a held-out set."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m alphaclip_plugins.train.mllm_synthetic",
                                     description="write synthetic region conversations (free scenes of shapes)")
    parser.add_argument("out", help="the JSONL to write; images and masks go beside it")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1, help="the training set's is 0: another seed is held out")
    args = parser.parse_args(argv)
    ensure_conversations(args.out, ConversationConfig(num_images=args.num_images, seed=args.seed))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
