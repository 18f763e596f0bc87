"""Streaming tar shards in the webdataset layout, with Python's ``tarfile`` only.

A shard is a plain tar whose members are grouped into samples by key: ``000017.jpg`` and ``000017.json``
(and optional extras such as ``000017.mask.png``) form sample ``000017``. The JSON holds ``caption``,
``region`` (as in a JSONL manifest; ``{"mask": "mask.png"}`` names the extra member of the sample) and
optionally ``image_caption``. Shards are read sequentially, never unpacked.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .data import DataError, Record, SampleError, _check_caption, normalise_region

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
Files = Dict[str, bytes]  # extension -> bytes, for one sample


def expand_shards(spec: Union[str, Sequence[str]]) -> List[str]:
    """Shard paths from a folder, a glob (``data/shard-*.tar``) or a list of either, sorted and de-duplicated."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: List[str] = []
    for s in specs:
        s = str(s)
        if os.path.isdir(s):
            out += sorted(glob.glob(os.path.join(s, "*.tar")))
        elif any(c in s for c in "*?["):
            out += sorted(glob.glob(s))
        else:
            out.append(s)
    out = sorted(dict.fromkeys(out))
    if not out:
        raise DataError(f"no tar shards found for {spec!r}; pass a folder of .tar files, a glob or a list of paths")
    return out


def _split_name(name: str) -> Tuple[str, str]:
    """``dir/000017.mask.png`` -> (``dir/000017``, ``mask.png``)."""
    head, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return os.path.join(head, key), ext.lower()


def read_shard(path: str) -> Iterator[Tuple[str, Files]]:
    """Yield ``(sample name, {ext: bytes})`` for each sample of one shard, in order.

    Raises:
        SampleError: the shard cannot be opened or is truncated (samples before the damage are yielded). A
            tar has no index, so how many samples followed the damage cannot be known: the message says how
            many were read and which sample was cut.
    """
    key, files, done = None, {}, 0
    try:
        with tarfile.open(path, mode="r|*") as tar:  # "|": a stream, no seeking, no index
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if key is not None and k != key:
                    yield f"{path}:{key}", files
                    files, done = {}, done + 1
                key = k
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is truncated ({len(data)} of {member.size} bytes)")
                files[ext] = data
    except (OSError, tarfile.TarError, EOFError) as e:
        raise SampleError(f"cannot read shard {path} ({type(e).__name__}: {e}){_lost(done, key)}") from None
    if key is not None:
        yield f"{path}:{key}", files
        done += 1
    if path.endswith(".tar") and not _has_end_marker(path):
        raise SampleError(f"cannot read shard {path} past its last complete sample: it has no end-of-archive "
                          f"marker (truncated? re-copy or re-write it); {done} samples were read, any that "
                          f"followed are lost")


def _lost(done: int, key: Optional[str]) -> str:
    """What a shard that broke off lost: the sample being read and all after it (their number is unknown)."""
    if key is None:
        return "; no sample could be read from it"
    return (f"; {done} samples were read, then sample {os.path.basename(key)} and every sample after it in the "
            f"shard were lost (a tar has no index, so how many cannot be known)")


def _has_end_marker(path: str) -> bool:
    """Whether an uncompressed tar ends with the two zero blocks that close every complete archive."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 1024:
            return False
        f.seek(-1024, os.SEEK_END)
        return f.read(1024) == bytes(1024)


def stream_samples(shards: Sequence[str], seed: int, stream: int) -> Iterator[Tuple[str, Union[Files, str]]]:
    """One stream's samples forever: its shards in a new seeded order each pass.

    Yields ``(name, files)``, or ``(shard path, error message)`` for a shard that failed to read.
    """
    for epoch in range(1 << 62):
        order = np.random.default_rng([seed, stream, epoch]).permutation(len(shards))
        for i in order:
            try:
                yield from read_shard(shards[int(i)])
            except SampleError as e:
                yield shards[int(i)], str(e)


def shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A shuffle buffer of ``size`` items (``size <= 1``: unchanged order)."""
    if size <= 1:
        yield from items
        return
    buf: List = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = item
    while buf:  # only reached by finite inputs
        yield buf.pop(int(rng.integers(len(buf))))


def to_record(name: str, files: Files) -> Tuple[Record, Files]:
    """A sample's members -> (record whose paths are member extensions, files)."""
    image_ext = next((e for e in IMAGE_EXTS if e in files), None)
    if image_ext is None:
        raise SampleError(f"no image member ({'/'.join(IMAGE_EXTS)}) among {sorted(files)}")
    if "json" not in files:
        raise SampleError(f"no .json member among {sorted(files)}")
    try:
        meta = json.loads(files["json"])
        region = normalise_region(meta.get("region"))
        caption = _check_caption(meta["caption"])
    except (ValueError, KeyError, TypeError) as e:
        raise SampleError(f"bad .json member ({type(e).__name__}: {e})") from None
    return Record(image_ext, caption, region, meta.get("image_caption"), name), files


def member_opener(files: Files):
    """An opener for :class:`~.data.SampleDecoder` reading a sample's members by extension."""

    def open_member(ext: str) -> bytes:
        if ext not in files:
            raise SampleError(f"the sample has no member .{ext} (it has {sorted(files)})")
        return files[ext]

    return open_member
