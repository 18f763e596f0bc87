"""Converters from public region datasets to region conversations (:mod:`.mllm_data`), and their CLI.

Each converter is a pure function of parsed annotations returning ``(samples, skipped)``: the samples
(JSON-ready dicts, one per (region, text)) and ``(name, reason)`` of annotations it could not use.

* RefCOCO / RefCOCO+ / RefCOCOg: :func:`from_refcoco` takes the ``refs(*).p`` list (read with
  :func:`load_refs`, which reads the pickle with :func:`safe_pickle_load`: plain containers, strings and
  numbers only, any other object refused) or its JSON export, and the COCO ``instances.json``;
* Visual Genome: :func:`from_visual_genome` takes ``region_descriptions.json``;
* the trainer's files: :func:`from_records` takes what ``train/data.py`` reads (COCO-style referring files
  or JSONL manifests).

CLI (writes JSONL, prints how many samples were written and skipped, lists the skipped)::

    python -m alphaclip_plugins.train.mllm_convert refcoco --refs 'refs(umd).p' --instances instances.json \\
        --split train --image-dir train2014 -o refcocog_train.jsonl
    python -m alphaclip_plugins.train.mllm_convert vg --regions region_descriptions.json --image-dir VG_100K -o vg.jsonl
    python -m alphaclip_plugins.train.mllm_convert coco referring.json -o referring.jsonl
    python -m alphaclip_plugins.train.mllm_convert check refcocog_train.jsonl   # decode every sample once
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .data import DataError, Record, SampleError, _coco_region, read_coco, read_jsonl
from .mllm_data import IMAGE_TOKEN, ConversationDataset, check_conversations

DEFAULT_PROMPT = "Describe the highlighted region in a short phrase."
Converted = Tuple[List[Dict[str, Any]], List[Tuple[str, str]]]  # samples, (name, reason) of skipped annotations


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings, bytes, numbers, booleans and None; refuses every global (so no
    class, function or reducer named in the file is ever imported or called)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"the pickle asks for {module}.{name}; only plain containers, strings and numbers are read from "
            f"annotation pickles (convert the file to JSON if it really holds objects)"
        )


def safe_pickle_load(data: bytes) -> Any:
    """Unpickle ``data`` holding only plain data (Python 2 strings are read as UTF-8)."""
    return _PlainUnpickler(io.BytesIO(data), encoding="utf-8", errors="replace").load()


def load_refs(path: str | Path) -> List[Dict[str, Any]]:
    """A ``refs(*).p`` pickle (read safely) or its JSON export -> the list of refs."""
    path = Path(path)
    data = path.read_bytes()
    refs = json.loads(data) if path.suffix == ".json" else safe_pickle_load(data)
    if not isinstance(refs, list):
        raise ValueError(f"{path} holds a {type(refs).__name__}; expected the list of refs of a refs(*).p file")
    return refs


def sample(image: str, region: Any, answer: str, prompt: str, sid: str) -> Dict[str, Any]:
    """One single-turn region conversation: the prompt asks, ``answer`` is the gpt turn."""
    return {"id": sid, "image": image, "region": region, "conversations": [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}, {"from": "gpt", "value": answer}]}


def _join(image_dir: str, name: str) -> str:
    return f"{image_dir.rstrip('/')}/{name}" if image_dir else name


def from_refcoco(refs: Sequence[Dict[str, Any]], instances: Dict[str, Any], split: Optional[str] = None,
                 region: str = "segmentation", prompt: str = DEFAULT_PROMPT, image_dir: str = "",
                 prefix: str = "ref") -> Converted:
    """RefCOCO / RefCOCO+ / RefCOCOg refs + COCO instances -> one sample per (ref, sentence).

    Args:
        refs: the refs list (``ref_id``, ``ann_id``, ``split``, ``sentences`` with ``sent``/``raw``).
        instances: the COCO ``instances.json`` (``images`` and ``annotations``) the refs point into.
        split: keep only refs of this split (``"train"``, ``"val"``, ``"test"``, ``"testA"``, ...); None = all.
        region: ``"segmentation"`` (the object's mask) or ``"box"``.
        image_dir: folder prepended to the COCO ``file_name`` (e.g. ``"train2014"``).
    """
    images = {im["id"]: im for im in instances.get("images", [])}
    anns = {ann["id"]: ann for ann in instances.get("annotations", [])}
    samples: List[Dict[str, Any]] = []
    skipped: List[Tuple[str, str]] = []
    for ref in refs:
        if split is not None and ref.get("split") != split:
            continue
        name = f"ref {ref.get('ref_id')}"
        ann = anns.get(ref.get("ann_id"))
        if ann is None:
            skipped.append((name, f"ann_id {ref.get('ann_id')!r} is not in instances.json"))
            continue
        im = images.get(ann.get("image_id"))
        if im is None:
            skipped.append((name, f"image_id {ann.get('image_id')!r} is not in instances.json"))
            continue
        try:
            reg = _coco_region(ann, "segmentation" if region == "segmentation" else "bbox")
        except (SampleError, TypeError, ValueError) as e:
            skipped.append((name, str(e)))
            continue
        for j, sent in enumerate(ref.get("sentences") or []):
            text = (sent.get("sent") or sent.get("raw") or "") if isinstance(sent, dict) else str(sent)
            if not text.strip():
                skipped.append((f"{name} sentence {j}", "empty sentence"))
                continue
            sid = f"{prefix}-{ref.get('ref_id')}-{sent.get('sent_id', j) if isinstance(sent, dict) else j}"
            samples.append(sample(_join(image_dir, im["file_name"]), reg, text.strip(), prompt, sid))
    return samples, skipped


def from_visual_genome(images: Sequence[Dict[str, Any]], prompt: str = DEFAULT_PROMPT,
                       image_dir: str = "") -> Converted:
    """Visual Genome ``region_descriptions.json`` (per image ``id`` and ``regions`` with ``x``, ``y``,
    ``width``, ``height``, ``phrase``) -> one sample per region, the image at ``image_dir/<id>.jpg``."""
    samples: List[Dict[str, Any]] = []
    skipped: List[Tuple[str, str]] = []
    for entry in images:
        image_id = entry.get("id", entry.get("image_id"))
        for r in entry.get("regions") or []:
            name = f"image {image_id} region {r.get('region_id', r.get('id'))}"
            try:
                x, y, w, h = (float(r[k]) for k in ("x", "y", "width", "height"))
            except (KeyError, TypeError, ValueError):
                skipped.append((name, "needs numeric x, y, width and height"))
                continue
            phrase = r.get("phrase")
            if w <= 0 or h <= 0 or x < 0 or y < 0:
                skipped.append((name, f"box x={x}, y={y}, width={w}, height={h} is empty or negative"))
            elif not isinstance(phrase, str) or not phrase.strip():
                skipped.append((name, "empty phrase"))
            else:
                sid = f"vg-{image_id}-{r.get('region_id', len(samples))}"
                samples.append(sample(_join(image_dir, f"{image_id}.jpg"), {"box": [x, y, x + w, y + h]},
                                      phrase.strip(), prompt, sid))
    return samples, skipped


def from_records(records: Iterable[Record], prompt: str = DEFAULT_PROMPT, relative_to: Optional[str] = None) -> Converted:
    """The trainer's records (``read_coco`` / ``read_jsonl``) -> one sample per (region, expression).

    Args:
        relative_to: write image and mask paths relative to this folder (the output file's), so that the
            output reads from anywhere; None keeps the records' paths.
    """
    def where(p: str) -> str:
        return p if relative_to is None else os.path.relpath(os.path.abspath(p), os.path.abspath(relative_to))

    samples: List[Dict[str, Any]] = []
    skipped: List[Tuple[str, str]] = []
    for i, rec in enumerate(records):
        if rec.error:
            skipped.append((rec.name, rec.error))
            continue
        region = rec.region
        if isinstance(region, dict) and isinstance(region.get("mask"), str):
            region = {"mask": where(region["mask"])}
        samples.append(sample(where(rec.image), region, rec.caption, prompt, f"{rec.name or 'sample'}#{i}"))
    return samples, skipped


def write_jsonl(samples: Iterable[Dict[str, Any]], path: str | Path) -> int:
    """Write samples one a line (atomically: a partial file never has the final name); returns how many."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def _report(skipped: List[Tuple[str, str]], first: int = 10) -> str:
    lines = [f"  {n}: {r}" for n, r in skipped[:first]]
    more = f"\n  ... and {len(skipped) - first} more" if len(skipped) > first else ""
    return "\n".join(lines) + more


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m alphaclip_plugins.train.mllm_convert",
                                description="Convert region datasets to region conversations (JSONL).")
    sub = p.add_subparsers(dest="source", required=True)
    ref = sub.add_parser("refcoco", help="RefCOCO / RefCOCO+ / RefCOCOg refs(*).p (or its JSON export) + instances.json")
    ref.add_argument("--refs", required=True)
    ref.add_argument("--instances", required=True)
    ref.add_argument("--split", default=None)
    ref.add_argument("--region", choices=("segmentation", "box"), default="segmentation")
    ref.add_argument("--prefix", default="ref", help="id prefix, e.g. refcocog")
    vg = sub.add_parser("vg", help="Visual Genome region_descriptions.json")
    vg.add_argument("--regions", required=True)
    coco = sub.add_parser("coco", help="the trainer's COCO-style referring file (.json) or JSONL manifest (.jsonl)")
    coco.add_argument("file")
    coco.add_argument("--region", choices=("segmentation", "bbox"), default="segmentation")
    for s in (ref, vg, coco):
        s.add_argument("-o", "--output", required=True)
        s.add_argument("--prompt", default=DEFAULT_PROMPT)
    for s in (ref, vg):
        s.add_argument("--image-dir", default="", help="folder prepended to image file names in the output")
    check = sub.add_parser("check", help="decode every sample of a region-conversation file once")
    check.add_argument("file")
    check.add_argument("--image-root", default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.source == "check":
        report = check_conversations(ConversationDataset.from_file(args.file, args.image_root))
        print(f"{report['tried'] - len(report['bad'])} of {report['tried']} samples readable")
        if report["bad"]:
            print(f"{len(report['bad'])} skipped:\n{_report(report['bad'], len(report['bad']))}")
        return 1 if report["bad"] else 0
    try:
        if args.source == "refcoco":
            instances = json.loads(Path(args.instances).read_text())
            samples, skipped = from_refcoco(load_refs(args.refs), instances, args.split, args.region, args.prompt,
                                            args.image_dir, args.prefix)
        elif args.source == "vg":
            samples, skipped = from_visual_genome(json.loads(Path(args.regions).read_text()), args.prompt,
                                                  args.image_dir)
        else:
            read = read_jsonl if args.file.endswith(".jsonl") else lambda f: read_coco(f, region=args.region)
            samples, skipped = from_records(read(args.file), args.prompt, str(Path(args.output).parent))
    except (OSError, ValueError, pickle.UnpicklingError, SampleError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = write_jsonl(samples, args.output)
    print(f"wrote {n} samples to {args.output}; skipped {len(skipped)}")
    if skipped:
        print(_report(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
