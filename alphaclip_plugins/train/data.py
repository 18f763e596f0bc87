"""Region-text samples: where they come from and how one becomes model inputs.

Sources:

* a JSONL manifest, one sample per line::

      {"image": "images/1.jpg", "caption": "a red car", "region": <region>, "image_caption": "a street"}

  with ``region`` one of ``{"rle": {"size": [h, w], "counts": ...}}`` (or a bare COCO RLE),
  ``{"polygon": [x0, y0, x1, y1, ...]}``, ``{"box": [x0, y0, x1, y1]}`` (corners, pixels),
  ``{"bbox": [x, y, w, h]}`` (COCO), ``{"mask": "masks/1.png"}`` (a mask image), or null (whole image).
  Paths are relative to the manifest's folder (or ``image_root``); ``image_caption`` is optional.
* a COCO-style annotation file: ``images`` (``id``, ``file_name``, optional ``caption``) and
  ``annotations`` (``image_id``, ``segmentation`` and/or ``bbox`` (xywh), and the referring expression
  as ``caption``, ``expression``, ``expressions`` or RefCOCO-style ``sentences``); one sample per expression.
* tar shards in the webdataset layout, read by :mod:`.shards`.

Any sample that cannot be read (missing file, corrupt image, bad region) raises :class:`SampleError`;
the streams skip it and count it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..core.images import open_image, open_mask
from ..core.processor import RegionProcessor


class SampleError(Exception):
    """One sample could not be read; it is skipped and counted."""


class DataError(RuntimeError):
    """Too many samples could not be read, or the data cannot feed the run: training stops."""


@dataclass
class Record:
    """One region-text sample before decoding."""

    image: str  # image path (absolute, or relative to the source's root)
    caption: str  # text describing the region
    region: Any = None  # a region (see the module docstring); None = the whole image
    image_caption: Optional[str] = None  # caption of the whole image, for whole-image samples
    name: str = ""  # how errors refer to the sample, e.g. "train.jsonl:12"
    error: Optional[str] = None  # set when the annotation itself was unreadable


def _check_caption(caption: Any) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise SampleError(f"caption must be a non-empty string, got {caption!r}")
    return caption


def normalise_region(region: Any) -> Any:
    """Manifest region -> a core region (see ``core/regions.py``); mask files stay ``{"mask": path}``."""
    if region is None:
        return None
    if isinstance(region, dict) and set(region) == {"bbox"}:  # COCO xywh -> corners
        x, y, w, h = (float(v) for v in region["bbox"])
        return {"box": [x, y, x + w, y + h]}
    if isinstance(region, dict) and ("counts" in region or len(region) == 1):
        return region
    raise SampleError(
        f"unknown region {region!r}; use {{'rle': ...}}, {{'polygon': [...]}}, {{'box': [x0, y0, x1, y1]}}, "
        f"{{'bbox': [x, y, w, h]}}, {{'mask': 'file.png'}} or null"
    )


def read_jsonl(path: Path | str, image_root: Optional[str] = None) -> List[Record]:
    """Parse a JSONL manifest. A malformed line becomes a record that fails (and is counted) when read."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    records: List[Record] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            name = f"{path.name}:{n}"
            try:
                d = json.loads(line)
                rec = Record(str(root / d["image"]), _check_caption(d["caption"]), normalise_region(d.get("region")),
                             d.get("image_caption"), name)
                if isinstance(rec.region, dict) and isinstance(rec.region.get("mask"), str):
                    rec.region = {"mask": str(root / rec.region["mask"])}
            except (ValueError, KeyError, TypeError, SampleError) as e:
                rec = Record("", "", None, None, name, error=f"bad manifest line ({type(e).__name__}: {e})")
            records.append(rec)
    if not records:
        raise DataError(f"{path} holds no samples; expected one JSON object per line")
    return records


def _expressions(ann: Dict[str, Any]) -> List[str]:
    for key in ("caption", "expression"):
        if isinstance(ann.get(key), str):
            return [ann[key]]
    out = ann.get("expressions") or ann.get("sentences") or []
    return [s["sent"] if isinstance(s, dict) else s for s in out]


def _coco_region(ann: Dict[str, Any], use: str) -> Any:
    seg = ann.get("segmentation")
    if use == "segmentation" and seg:
        if isinstance(seg, dict):
            return {"rle": seg}
        return {"polygon": seg}
    if ann.get("bbox") is not None:
        return normalise_region({"bbox": ann["bbox"]})
    raise SampleError("annotation has neither a segmentation nor a bbox")


def read_coco(path: Path | str, image_root: Optional[str] = None, region: str = "segmentation") -> List[Record]:
    """Parse a COCO-style file with referring expressions; one record per (annotation, expression).

    Args:
        region: ``"segmentation"`` (falls back to ``bbox`` where absent) or ``"bbox"``.
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    data = json.loads(path.read_text())
    if "images" not in data or "annotations" not in data:
        raise DataError(f"{path} is not a COCO-style file: it needs 'images' and 'annotations' lists")
    images = {im["id"]: im for im in data["images"]}
    records: List[Record] = []
    for ann in data["annotations"]:
        name = f"{path.name}:annotation {ann.get('id', len(records))}"
        im = images.get(ann.get("image_id"))
        try:
            if im is None:
                raise SampleError(f"image_id {ann.get('image_id')!r} is not in 'images'")
            reg, texts = _coco_region(ann, region), _expressions(ann)
            if not texts:
                raise SampleError("annotation has no caption, expression(s) or sentences")
            caption = im.get("caption") or (im.get("captions") or [None])[0]
            for t in texts:
                records.append(Record(str(root / im["file_name"]), _check_caption(t), reg, caption, name))
        except SampleError as e:
            records.append(Record("", "", None, None, name, error=str(e)))
    if not records:
        raise DataError(f"{path} holds no annotations")
    return records


Opener = Callable[[str], bytes]


def _open_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SampleError(f"cannot read {path}: {e.strerror or e}") from None


def decode_image(data: bytes, what: str = "image", mode: str = "RGB") -> Any:
    """Bytes -> a fully loaded RGB PIL image (``mode="RGB"``) or a float mask ``[H, W]`` (``mode="L"``), EXIF
    orientation applied (``core/images.py``); corrupt, truncated or unusable files raise :class:`SampleError`."""
    try:
        return open_image(data, what) if mode == "RGB" else open_mask(data, what)
    except Exception as e:  # PIL raises many types for bad bytes
        raise SampleError(f"cannot decode {what} ({e})") from None


class SampleDecoder:
    """Turns a :class:`Record` into ``(pixel_values [3, S, S], alpha [1, S, S], caption)``.

    Args:
        processor: the geometry shared by image and region.
        opener: reads a path's bytes (files by default; tar members for shards).
    """

    def __init__(self, processor: RegionProcessor, opener: Opener = _open_file):
        self.processor, self.opener = processor, opener

    def __call__(self, rec: Record, whole: bool) -> Tuple[torch.Tensor, torch.Tensor, str]:
        if rec.error:
            raise SampleError(rec.error)
        image = decode_image(self.opener(rec.image), f"image {rec.image}")
        region, caption = rec.region, rec.caption
        if whole and rec.image_caption:
            region, caption = None, rec.image_caption
        if isinstance(region, dict) and isinstance(region.get("mask"), str):
            region = {"mask": decode_image(self.opener(region["mask"]), f"mask {region['mask']}", "L")}
        try:
            pixels, size = self.processor.pixels(image)
            alpha = self.processor.alphas([region], size)
        except (ValueError, KeyError, TypeError) as e:
            raise SampleError(f"bad region: {e}") from None
        return pixels[0], alpha[0], caption
