"""Deterministic, resumable batch streams over a map-style source (JSONL, COCO) or tar shards.

Both streams are infinite and yield collated micro-batches of one rank. Batch ``k`` of a rank is a pure
function of ``(seed, k)`` and the data position saved in a checkpoint, never of timing, so a resumed run
sees exactly the batches the uninterrupted run would have seen. DataLoader workers take turns (worker
``w`` makes the batches ``k = start + w (mod W)``), which matches the DataLoader's round-robin order.

* :class:`MapStream`: the global sample order is a seeded permutation per epoch; global micro-batch ``k``
  is positions ``[k * G, (k + 1) * G)`` of that order, and rank ``r`` takes its ``B``-slice. The global
  batch is therefore the same for any world size.
* :class:`ShardStream`: shards are split across (rank, worker) streams without overlap; each stream
  reads its shards forever (a new seeded order each pass) through a seeded shuffle buffer. The position
  is the number of raw samples each stream has consumed; a resume skips them without decoding.

A sample that fails to read is skipped; its name and reason travel with the batch (``bad``).
"""
from __future__ import annotations

from itertools import islice
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .data import DataError, Record, SampleDecoder, SampleError
from .shards import member_opener, shuffled, stream_samples, to_record

_MAX_CONSECUTIVE_BAD = 1000  # a stream that fails this often in a row has no readable data left


def _worker() -> Tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


Decoded = Tuple[torch.Tensor, torch.Tensor, str, str]  # pixels [3, S, S], alpha [1, S, S], caption, name


def collate(samples: List[Decoded], bad: List[Tuple[str, str]], **extra: Any) -> Dict[str, Any]:
    """Stack decoded samples into a micro-batch dict.

    Returns:
        ``pixel_values [B, 3, S, S]``, ``alpha [B, 1, S, S]``, ``captions`` (B strings),
        ``names`` (B sample names), ``bad`` (``(name, reason)`` of skipped samples), ``tried`` and any
        ``extra`` fields.
    """
    captions = [s[2] for s in samples]
    return dict(
        pixel_values=torch.stack([s[0] for s in samples]),
        alpha=torch.stack([s[1] for s in samples]),
        captions=captions, names=[s[3] for s in samples],
        bad=bad, tried=len(samples) + len(bad), **extra,
    )


class MapStream(IterableDataset):
    """Micro-batches of one rank from an indexable list of :class:`Record`.

    Args:
        records: the samples.
        decoder: record -> tensors.
        batch_size: samples per micro-batch on this rank (``B``).
        rank, world_size: this process and the number of processes.
        seed: drives the order, the whole-image choice and replacements of bad samples.
        whole_image_ratio: probability that a sample becomes the whole image with its image caption.
        start: index of the first micro-batch to produce (the resume position).
        shuffle: a new random order each epoch (False: file order, e.g. for evaluation).
    """

    def __init__(
        self, records: Sequence[Record], decoder: SampleDecoder, batch_size: int, rank: int = 0,
        world_size: int = 1, seed: int = 0, whole_image_ratio: float = 0.0, start: int = 0, shuffle: bool = True,
    ):
        self.records, self.decoder, self.batch_size = records, decoder, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.whole_image_ratio, self.start, self.shuffle = whole_image_ratio, start, shuffle
        self._perm: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def _index(self, position: int) -> int:
        n = len(self.records)
        epoch, offset = divmod(position, n)
        if not self.shuffle:
            return offset
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        return int(self._perm[1][offset])

    def sample(self, position: int, bad: List[Tuple[str, str]]) -> Decoded:
        """Decode the sample at a global position; a bad one is replaced by a seeded random other."""
        index = self._index(position)
        for attempt in range(_MAX_CONSECUTIVE_BAD):
            rng = np.random.default_rng([self.seed, position, attempt])
            rec = self.records[index]
            try:
                return self.decode(rec, rng)
            except SampleError as e:
                bad.append((rec.name or rec.image, str(e)))
                index = int(rng.integers(len(self.records)))
        raise DataError(f"{_MAX_CONSECUTIVE_BAD} samples in a row could not be read; last: {bad[-1]}")

    def decode(self, rec: Any, rng: np.random.Generator) -> Any:
        """One record -> a decoded sample (raises SampleError); a subclass may decode other records."""
        return (*self.decoder(rec, whole=bool(rng.random() < self.whole_image_ratio)), rec.name or rec.image)

    def collate(self, samples: List[Any], bad: List[Tuple[str, str]], k: int) -> Dict[str, Any]:
        return collate(samples, bad, index=k)

    def batch(self, k: int) -> Dict[str, Any]:
        """Micro-batch ``k`` of this rank: global positions ``k*G + rank*B + [0, B)``."""
        first = k * self.batch_size * self.world_size + self.rank * self.batch_size
        bad: List[Tuple[str, str]] = []
        samples = [self.sample(p, bad) for p in range(first, first + self.batch_size)]
        return self.collate(samples, bad, k)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        w, workers = _worker()
        k = self.start + w
        while True:
            yield self.batch(k)
            k += workers


class ShardStream(IterableDataset):
    """Micro-batches of one rank from tar shards (see the module docstring).

    Args:
        shards: all shard paths (every rank passes the same list).
        num_workers: the DataLoader's workers (0 = in the main process); fixes the shard split.
        positions: raw samples each of this rank's streams has consumed (the resume position), or None.
        start: micro-batches this rank has consumed.
        shuffle_buffer: samples held for shuffling within a stream (1 = shard order).
    """

    def __init__(
        self, shards: Sequence[str], decoder: SampleDecoder, batch_size: int, rank: int = 0, world_size: int = 1,
        num_workers: int = 0, seed: int = 0, whole_image_ratio: float = 0.0, start: int = 0,
        positions: Optional[Sequence[int]] = None, shuffle_buffer: int = 1000,
    ):
        self.streams = max(num_workers, 1)
        total = self.streams * world_size
        if len(shards) < total:
            raise DataError(
                f"{len(shards)} shards cannot feed {total} streams ({world_size} processes x {self.streams} "
                f"loader workers) without overlap; write at least {total} shards or use fewer workers"
            )
        self.shards, self.decoder, self.batch_size = list(shards), decoder, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.whole_image_ratio, self.start, self.shuffle_buffer = whole_image_ratio, start, shuffle_buffer
        self.positions = list(positions) if positions is not None else [0] * self.streams
        if len(self.positions) != self.streams:
            raise DataError(f"the resume position has {len(self.positions)} streams but this run has {self.streams}; "
                            f"resume with the same number of loader workers")

    def stream_shards(self, role: int) -> List[str]:
        """The shards of this rank's stream ``role``: disjoint from every other (rank, role)."""
        q = role * self.world_size + self.rank
        return self.shards[q :: self.streams * self.world_size]

    def _raw(self, role: int) -> Iterator:
        q = role * self.world_size + self.rank
        items = stream_samples(self.stream_shards(role), self.seed, q)
        return shuffled(items, self.shuffle_buffer, np.random.default_rng([self.seed, q, 1]))

    def _decode(self, role: int, pos: int, name: str, files: Any) -> Decoded:
        if isinstance(files, str):  # a shard that failed to read
            raise SampleError(files)
        rec, files = to_record(name, files)
        whole = np.random.default_rng([self.seed, role * self.world_size + self.rank, pos]).random()
        decoder = SampleDecoder(self.decoder.processor, member_opener(files))
        return (*decoder(rec, whole < self.whole_image_ratio), name)

    def _batches(self, role: int, k: int) -> Iterator[Dict[str, Any]]:
        # This role made micro-batches role, role + W, ... of the rank; its consumed count says where it is.
        pos = self.positions[role]
        raw = islice(self._raw(role), pos, None)  # skip without decoding
        while True:
            samples: List[Decoded] = []
            bad: List[Tuple[str, str]] = []
            while len(samples) < self.batch_size:
                name, files = next(raw)
                pos += 1
                try:
                    samples.append(self._decode(role, pos, name, files))
                except SampleError as e:
                    bad.append((name, str(e)))
                    if len(bad) >= _MAX_CONSECUTIVE_BAD and not samples:
                        raise DataError(f"{len(bad)} samples in a row could not be read; last: {bad[-1]}") from None
            yield collate(samples, bad, index=k, role=role, position=pos)
            k += self.streams

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        w, workers = _worker()
        if workers != self.streams:
            raise DataError(f"ShardStream was built for {self.streams} workers but runs in {workers}")
        # Rotate roles so that the stream whose turn is next runs in worker 0, which the DataLoader asks first.
        role = (self.start + w) % self.streams
        return self._batches(role, self.start + w)
