"""From a :class:`~.config.DataConfig` to a DataLoader of micro-batches, its resume position and its health."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from torch.utils.data import DataLoader

from ..core.processor import RegionProcessor
from .config import DataConfig
from .data import DataError, Record, SampleDecoder, read_coco, read_jsonl
from .shards import expand_shards
from .streams import MapStream, ShardStream
from .synthetic import SyntheticConfig, dataset_fingerprint, write_jsonl, write_shards


def data_format(path: str, fmt: str = "auto") -> str:
    """``jsonl``, ``coco`` or ``tar`` for a data path (``fmt`` wins unless ``"auto"``)."""
    if fmt != "auto":
        return fmt
    p = str(path)
    if p.endswith(".jsonl"):
        return "jsonl"
    if p.endswith(".json"):
        return "coco"
    if p.endswith(".tar") or os.path.isdir(p) or any(c in p for c in "*?["):
        return "tar"
    raise DataError(f"cannot tell the format of {p!r}; set data.format to jsonl, coco or tar")


def ensure_synthetic(path: Optional[str], cfg: Optional[SyntheticConfig]) -> None:
    """Write synthetic data at ``path`` (a ``.jsonl`` manifest or a shard folder) unless it already exists.

    A stamp file named after the config marks finished data; an interrupted write is redone.
    """
    if cfg is None or path is None:
        return
    target = Path(path)
    stamp = (target.parent if target.suffix == ".jsonl" else target) / f".synthetic-{dataset_fingerprint(cfg)}"
    if stamp.exists():
        return
    if target.suffix == ".jsonl":
        write_jsonl(target.parent, cfg, manifest=target.name)
    else:
        write_shards(target, cfg)
    stamp.touch()


def read_records(path: str, cfg: DataConfig, fmt: str = "auto") -> List[Record]:
    """All records of a map-style source (JSONL or COCO)."""
    fmt = data_format(path, fmt)
    if not Path(path).exists():
        raise DataError(f"data file {path} does not exist; check data.train / data.eval")
    if fmt == "jsonl":
        return read_jsonl(path, cfg.image_root)
    if fmt == "coco":
        return read_coco(path, cfg.image_root, cfg.coco_region)
    raise DataError(f"{path} is a tar source, not a list of records")


@dataclass
class DataState:
    """Where a rank's data stream stands: micro-batches consumed and, for shards, raw samples per stream."""

    batches: int = 0
    positions: List[int] = field(default_factory=list)

    def advance(self, batch: Dict[str, Any]) -> None:
        self.batches += 1
        if "role" in batch:
            role = int(batch["role"])
            self.positions += [0] * (role + 1 - len(self.positions))
            self.positions[role] = int(batch["position"])

    def state_dict(self) -> Dict[str, Any]:
        return {"batches": self.batches, "positions": list(self.positions)}

    @classmethod
    def from_state(cls, d: Dict[str, Any]) -> "DataState":
        return cls(int(d["batches"]), [int(p) for p in d.get("positions", [])])


def make_loader(
    cfg: DataConfig, image_size: int, batch_size: int, rank: int, world_size: int, seed: int, state: DataState
) -> DataLoader:
    """An endless DataLoader of this rank's micro-batches, starting at ``state``."""
    if cfg.train is None:
        raise DataError("data.train is not set; point it at a JSONL manifest, a COCO-style file or tar shards")
    decoder = SampleDecoder(RegionProcessor(image_size, cfg.geometry))
    if data_format(cfg.train, cfg.format) == "tar":
        streams = max(cfg.num_workers, 1)
        positions = state.positions or [0] * streams
        positions += [0] * (streams - len(positions))
        dataset: Any = ShardStream(
            expand_shards(cfg.train), decoder, batch_size, rank, world_size, cfg.num_workers, seed,
            cfg.whole_image_ratio, state.batches, positions, cfg.shuffle_buffer,
        )
    else:
        dataset = MapStream(read_records(cfg.train, cfg, cfg.format), decoder, batch_size, rank, world_size, seed,
                            cfg.whole_image_ratio, state.batches)
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                      persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)


def eval_records(cfg: DataConfig) -> Optional[Tuple[List[Record], Any]]:
    """The evaluation samples and an opener, or None when no evaluation set is configured."""
    if cfg.eval is None:
        return None
    if data_format(cfg.eval) != "tar":  # the evaluation set's format is always told by its name
        return read_records(cfg.eval, cfg)[: cfg.eval_samples], None
    from .shards import read_shard, to_record

    out = []
    for shard in expand_shards(cfg.eval):
        for name, files in read_shard(shard):
            out.append(to_record(name, files))
            if len(out) >= cfg.eval_samples:
                return [r for r, _ in out], [f for _, f in out]
    return [r for r, _ in out], [f for _, f in out]


class DataHealth:
    """Counts unreadable samples and stops the run past ``max_bad_fraction``.

    The check starts once 100 samples were tried (or at once when nothing could be read).
    """

    def __init__(self, max_bad_fraction: float):
        self.max_bad_fraction = max_bad_fraction
        self.tried, self.bad = 0, 0
        self.examples: List[Tuple[str, str]] = []  # the first 20, kept across resumes
        self.pending: List[Tuple[int, str, str]] = []  # (step, name, reason) since the last take_pending()

    def update(self, batch: Dict[str, Any], step: int = 0) -> None:
        """Count a micro-batch's samples and skips (met in optimizer step ``step``); stop past the limit."""
        self.tried += int(batch["tried"])
        self.bad += len(batch["bad"])
        for name, reason in batch["bad"]:
            self.pending.append((step, str(name), str(reason)))
            if len(self.examples) < 20:
                self.examples.append((str(name), str(reason)))
        self.check()

    def take_pending(self) -> List[Tuple[int, str, str]]:
        """``(step, name, reason)`` of the samples skipped since the last call."""
        out, self.pending = self.pending, []
        return out

    @classmethod
    def merged(cls, states: List[Dict[str, Any]], max_bad_fraction: float) -> "DataHealth":
        """The health of several processes (their ``state_dict()``) as one."""
        out = cls(max_bad_fraction)
        out.tried, out.bad = sum(int(d["tried"]) for d in states), sum(int(d["bad"]) for d in states)
        out.examples = [tuple(e) for d in states for e in d["examples"]][:20]  # type: ignore[misc]
        return out

    def check(self) -> None:
        nothing_read = self.bad == self.tried
        if self.bad and self.bad > self.max_bad_fraction * self.tried and (self.tried >= 100 or nothing_read):
            names = "\n  ".join(f"{n}: {r}" for n, r in self.examples)
            raise DataError(
                f"{self.bad} of {self.tried} samples ({self.bad / self.tried:.1%}) could not be read, more than "
                f"data.max_bad_fraction={self.max_bad_fraction}. First failures:\n  {names}\n"
                f"Fix or remove these samples, or raise data.max_bad_fraction to train on the rest"
            )

    def summary(self, listing: Optional[Path] = None, first: int = 10) -> str:
        """How many samples were skipped and the first ``first`` with their reasons (``listing``: the full list)."""
        if not self.bad:
            return "no unreadable samples"
        where = f", all listed in {listing}" if listing is not None else ""
        lines = [f"  {n}: {r}" for n, r in self.examples[:first]]
        return f"{self.bad} of {self.tried} samples skipped as unreadable{where}; the first:\n" + "\n".join(lines)

    def state_dict(self) -> Dict[str, Any]:
        return {"tried": self.tried, "bad": self.bad, "examples": [list(e) for e in self.examples]}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.tried, self.bad = int(d["tried"]), int(d["bad"])
        self.examples = [tuple(e) for e in d["examples"]]  # type: ignore[misc]
