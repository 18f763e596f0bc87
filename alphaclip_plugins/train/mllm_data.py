"""Region conversations for fine-tuning MLLMs (LLaVA, BLIP-2): the sample format, reading and checking it.

A sample is LLaVA's conversation JSON plus a ``region``::

    {"id": "refcocog-12-0", "image": "train2014/COCO_train2014_000000000009.jpg",
     "region": {"box": [10, 20, 200, 240]},
     "conversations": [{"from": "human", "value": "<image>\\nDescribe the highlighted region."},
                       {"from": "gpt", "value": "a bowl of broccoli"}]}

``region`` takes every form the trainer reads (``train/data.py``): ``{"mask": "masks/1.png"}`` (a mask
image), ``{"rle": {...}}`` or a bare COCO RLE, ``{"polygon": [...]}``, ``{"box": [x0, y0, x1, y1]}`` or a
bare ``[x0, y0, x1, y1]``, ``{"bbox": [x, y, w, h]}`` (COCO), or null / absent (the whole image).

A sample holds one image and one region: its first human turn carries the one ``<image>`` token, and
every turn is about that region (several turns are fine). Several regions of one image are several
samples. Turns alternate ``human`` / ``gpt`` (``user`` / ``assistant`` are read as those), starting with
``human`` and ending with ``gpt``. Files are JSONL (one sample a line) or a JSON list; paths are relative
to the file's folder or ``image_root``.

Bad samples (unreadable line, missing ``<image>``, wrong roles, bad region; at decode time a missing or
corrupt image or mask, a region outside the image, an empty mask) are skipped, counted and listed with
their reasons: annotation errors are kept on the record, decode errors raise :class:`SampleError`, and
:class:`ConversationDataset` turns both into a :class:`BadSample` that collators count, as the trainer's
streams do (``bad`` and ``tried`` in each batch, read by ``DataHealth``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.regions import is_box, region_mask
from .data import Opener, SampleError, _open_file, decode_image, normalise_region

IMAGE_TOKEN = "<image>"
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}

Turn = Tuple[str, str]  # (role "human" | "gpt", text)


@dataclass
class ConversationRecord:
    """One region conversation before decoding."""

    image: str  # image path (absolute, or joined with the file's root)
    turns: List[Turn]  # (role, text), roles alternating human / gpt; the first human turn holds <image>
    region: Any = None  # a region in the trainer's manifest forms (mask files as {"mask": path}); None = whole image
    name: str = ""  # how errors refer to the sample, e.g. "refcocog.jsonl:12"
    id: Optional[str] = None  # the sample's own "id", if it has one
    error: Optional[str] = None  # set when the annotation itself was unreadable


@dataclass
class ConversationSample:
    """A decoded sample, ready for a collator."""

    image: Any  # RGB PIL image, EXIF orientation applied
    region: Optional[np.ndarray]  # float32 mask [H, W] in [0, 1] at the image's resolution; None = whole image
    turns: List[Turn]
    name: str = ""


@dataclass
class BadSample:
    """A sample that could not be read; collators skip it and list ``(name, reason)``."""

    name: str
    reason: str


def parse_turns(conversations: Any) -> List[Turn]:
    """LLaVA's ``conversations`` list -> checked ``(role, text)`` turns.

    Raises:
        SampleError: not a list of ``{"from", "value"}``, unknown or non-alternating roles, not starting
            with a human turn or not ending with a gpt turn, or not exactly one ``<image>`` (in the first turn).
    """
    if not isinstance(conversations, list) or not conversations:
        raise SampleError("'conversations' must be a non-empty list of {'from': ..., 'value': ...} turns")
    turns: List[Turn] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SampleError(f"turn {i} must be {{'from': 'human' | 'gpt', 'value': str}}; got {turn!r}")
        role = ROLES.get(str(turn.get("from", "")).lower())
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise SampleError(f"turn {i} is from {turn.get('from')!r} but turns alternate human / gpt starting with "
                              f"human; expected {expected!r}")
        turns.append((role, turn["value"]))
    if turns[-1][0] != "gpt":
        raise SampleError("the conversation ends with a human turn; it must end with the gpt answer to learn")
    count = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if count != 1 or IMAGE_TOKEN not in turns[0][1]:
        raise SampleError(f"the conversation holds {count} {IMAGE_TOKEN} tokens; put exactly one in the first human "
                          f"turn (one region per sample: ask about another region in another sample)")
    if any(not text.strip() for role, text in turns if role == "gpt"):
        raise SampleError("a gpt turn is empty; every answer needs text")
    return turns


def parse_region(region: Any) -> Any:
    """A sample's ``region`` -> the trainer's manifest form; a bare ``[x0, y0, x1, y1]`` becomes a box."""
    if is_box(region):
        return {"box": [float(v) for v in region]}
    return normalise_region(region)


def parse_sample(d: Any, root: Path, name: str) -> ConversationRecord:
    """One JSON object -> a record; an unreadable one gets ``error`` set (it is skipped and counted later)."""
    try:
        if not isinstance(d, dict):
            raise SampleError(f"a sample is a JSON object; got {type(d).__name__}")
        if not isinstance(d.get("image"), str) or not d["image"]:
            raise SampleError("the sample has no 'image' path")
        region = parse_region(d.get("region"))
        if isinstance(region, dict) and isinstance(region.get("mask"), str):
            region = {"mask": str(root / region["mask"])}
        sid = d.get("id")
        return ConversationRecord(str(root / d["image"]), parse_turns(d.get("conversations")), region, name,
                                  None if sid is None else str(sid))
    except SampleError as e:
        return ConversationRecord("", [], None, name, error=str(e))


def read_conversations(path: Union[str, Path], image_root: Optional[str] = None) -> List[ConversationRecord]:
    """Read a JSONL file (one sample a line) or a JSON list of samples (``.json``).

    A malformed sample becomes a record with ``error`` set, so that it is counted and listed, not lost.
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise SampleError(f"{path} is not valid JSON ({e}); expected a list of samples or JSONL") from None
        if not isinstance(items, list):
            raise SampleError(f"{path} holds a JSON {type(items).__name__}; expected a list of samples")
        return [parse_sample(d, root, f"{path.name}[{i}]") for i, d in enumerate(items)]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name = f"{path.name}:{n}"
        try:
            d = json.loads(line)
        except ValueError as e:
            records.append(ConversationRecord("", [], None, name, error=f"bad JSON line ({e})"))
            continue
        records.append(parse_sample(d, root, name))
    return records


def decode_conversation(rec: ConversationRecord, opener: Opener = _open_file) -> ConversationSample:
    """A record -> image and region mask at the image's resolution, checked against the image.

    Raises:
        SampleError: the annotation was unreadable, the image or mask is missing or corrupt, the region does
            not fit the image (outside it, another size, bad RLE) or covers no pixel.
    """
    if rec.error:
        raise SampleError(rec.error)
    image = decode_image(opener(rec.image), f"image {rec.image}")
    region = rec.region
    if isinstance(region, dict) and isinstance(region.get("mask"), str):
        region = {"mask": decode_image(opener(region["mask"]), f"mask {region['mask']}", "L")}
    try:
        mask = region_mask(region, image.height, image.width)
    except (ValueError, KeyError, TypeError) as e:
        raise SampleError(f"bad region: {e}") from None
    if mask is not None and not mask.any():
        raise SampleError(f"the region covers no pixel of the {image.width}x{image.height} image; "
                          f"give a region with pixels inside, or null for the whole image")
    return ConversationSample(image, mask, list(rec.turns), rec.name)


@dataclass
class ConversationDataset:
    """Map-style dataset of region conversations: item ``i`` is a :class:`ConversationSample` or, when it
    cannot be read, a :class:`BadSample` (never an exception, so one bad file does not stop a DataLoader)."""

    records: Sequence[ConversationRecord]
    opener: Opener = field(default=_open_file, repr=False)

    @classmethod
    def from_file(cls, path: Union[str, Path], image_root: Optional[str] = None) -> "ConversationDataset":
        return cls(read_conversations(path, image_root))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Union[ConversationSample, BadSample]:
        rec = self.records[i]
        try:
            return decode_conversation(rec, self.opener)
        except SampleError as e:
            return BadSample(rec.name, str(e))


def check_conversations(dataset: ConversationDataset) -> Dict[str, Any]:
    """Decode every sample once: ``{"tried": N, "bad": [(name, reason), ...]}``."""
    bad = [(item.name, item.reason) for item in (dataset[i] for i in range(len(dataset))) if isinstance(item, BadSample)]
    return {"tried": len(dataset), "bad": bad}
