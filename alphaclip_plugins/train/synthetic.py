"""Synthetic region-text data in which the region decides the caption.

Each image holds several coloured shapes (distinct colour-shape pairs) at random places on a grey
background: on the patch grid of a 64 px square (:func:`draw_image`), or anywhere in images of any size
and aspect ratio (:mod:`.scenes`, with :class:`SceneConfig`; the embedded model's data). Each sample
selects one shape with its mask and describes that shape ("a red circle", "There is a small blue square
in the scene."); the whole image holds several answers at once, so only the alpha channel can tell which
one is meant.

The generator writes the same formats the real loaders read (a JSONL manifest with image files, or tar
shards in the webdataset layout), so training on it exercises the real data path.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..core.regions import polygon_mask

#: Colour names and their RGB values: far apart, so that colour is easy to see but must be looked for.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 170, 60), "blue": (40, 75, 215), "yellow": (235, 205, 30),
    "purple": (145, 55, 185),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: Tuple[str, ...] = ("small", "medium", "large")

#: Caption templates; ``{x}`` is "colour shape", ``{s}`` the shape's size word. They cover the prompt
#: styles zero-shot classification uses (CLIP's and OVSeg's), so the text tower learns to read them.
TEMPLATES: Tuple[str, ...] = (
    "a {x}", "a {x}.", "the {x}", "a photo of a {x}.", "This is a photo of a {x}", "There is a {x} in the scene",
    "There is the {x} in the scene", "a photo of a {x} in the scene", "a {s} {x}", "a photo of a {s} {x}.",
    "This is a photo of a {s} {x}.", "There is a {s} {x} in the scene.",
)

RegionFormat = Literal["rle", "polygon", "box", "mask", "mixed"]
_FORMATS = ("rle", "polygon", "box", "mask")


def labels() -> List[str]:
    """Every class the generator draws, as ``"colour shape"``: ``["red circle", "red square", ...]``."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


@dataclass
class Shape:
    """One drawn shape: class, size bin and geometry in pixels."""

    colour: str
    shape: str
    size: str  # "small" | "medium" | "large"
    box: Tuple[int, int, int, int]  # (x0, y0, x1, y1), end exclusive
    polygon: List[float]  # flat (x, y) outline; a circle is approximated
    occluded: bool = False  # partly covered by a later shape: its mask is the visible part, not the polygon

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class SyntheticImage:
    image: Image.Image  # RGB
    shapes: List[Shape]
    masks: List[np.ndarray]  # one uint8 {0, 1} mask [H, W] per shape

    @property
    def caption(self) -> str:
        """The whole-image caption: every shape, in drawing order."""
        names = [f"a {s.label}" for s in self.shapes]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _outline(shape: str, x0: int, y0: int, d: int) -> List[Tuple[float, float]]:
    """The shape's outline inside the ``d x d`` square at ``(x0, y0)``."""
    if shape == "square":
        return [(x0, y0), (x0 + d, y0), (x0 + d, y0 + d), (x0, y0 + d)]
    if shape == "triangle":
        return [(x0 + d / 2, y0), (x0 + d, y0 + d), (x0, y0 + d)]
    if shape == "cross":
        a, b = x0 + d / 3, x0 + 2 * d / 3
        c, e = y0 + d / 3, y0 + 2 * d / 3
        return [(a, y0), (b, y0), (b, c), (x0 + d, c), (x0 + d, e), (b, e), (b, y0 + d), (a, y0 + d), (a, e),
                (x0, e), (x0, c), (a, c)]
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)  # circle
    r = d / 2
    return [(float(x0 + r + r * np.cos(v)), float(y0 + r + r * np.sin(v))) for v in t]


def _place(
    rng: np.random.Generator, sizes: Sequence[int], image_size: int, grid: int, gap: int = 2
) -> Optional[List[Tuple[int, int]]]:
    """Top-left corners on a ``grid`` for squares of ``sizes`` that do not overlap (None if random tries fail)."""
    placed: List[Tuple[int, int, int]] = []
    for d in sizes:
        starts = np.arange(0, image_size - d + 1, grid) if grid > 1 else np.arange(1, image_size - d)
        for _ in range(200):
            x, y = (int(v) for v in rng.choice(starts, size=2))
            if all(x + d + gap <= px or px + pd + gap <= x or y + d + gap <= py or py + pd + gap <= y
                   for px, py, pd in placed):
                placed.append((x, y, d))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def draw_image(
    rng: np.random.Generator, image_size: int = 64, num_shapes: int = 4, min_size: int = 16, max_size: int = 24,
    grid: int = 8,
) -> SyntheticImage:
    """Draw one image with ``num_shapes`` shapes of distinct (colour, shape) classes.

    Shapes start on a ``grid`` (pixels); aligned with a ViT's patches, a tiny model learns shapes in minutes.
    """
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    if num_shapes > len(classes):
        raise ValueError(f"num_shapes={num_shapes} exceeds the {len(classes)} distinct colour-shape classes")
    for _ in range(100):
        sizes = [int(v) for v in rng.integers(min_size, max_size + 1, size=num_shapes)]
        corners = _place(rng, sizes, image_size, grid)
        if corners is not None:
            break
    else:
        raise ValueError(f"cannot place {num_shapes} shapes of {min_size}-{max_size} px apart in a {image_size} px "
                         f"image; use fewer or smaller shapes, or a larger image")
    picks = rng.choice(len(classes), size=num_shapes, replace=False)
    grey = int(rng.integers(70, 170))
    pixels = np.full((image_size, image_size, 3), grey, dtype=np.uint8)
    shapes, masks = [], []
    span = max(max_size - min_size + 1, 1)
    for k, ((x, y), d) in enumerate(zip(corners, sizes)):
        colour, name = classes[int(picks[k])]
        polygon = [float(v) for p in _outline(name, x, y, d) for v in p]
        # The mask is the polygon rasterised as every region decoder does (pycocotools), and the
        # shape is painted through it: mask, RLE and polygon regions all select exactly the drawn pixels.
        mask = polygon_mask(polygon, image_size, image_size).astype(np.uint8)
        pixels[mask.astype(bool)] = COLOURS[colour]
        size = SIZES[min((d - min_size) * len(SIZES) // span, len(SIZES) - 1)]
        shapes.append(Shape(colour, name, size, (x, y, x + d, y + d), polygon))
        masks.append(mask)
    image = Image.fromarray(pixels)
    return SyntheticImage(image, shapes, masks)


def caption_for(shape: Shape, rng: Optional[np.random.Generator]) -> str:
    """A training caption from a random template, or the canonical ``"a colour shape"`` when ``rng`` is None."""
    if rng is None:
        return f"a {shape.label}"
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(x=shape.label, s=shape.size)


def _region(fmt: str, shape: Shape, mask: np.ndarray, mask_ref: str) -> Dict[str, object]:
    if fmt == "box":
        return {"box": list(shape.box)}
    if fmt == "polygon":
        return {"polygon": shape.polygon}
    if fmt == "mask":
        return {"mask": mask_ref}
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"rle": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}}


@dataclass
class SceneConfig:
    """Free scenes (:mod:`.scenes`): shapes anywhere, images of any aspect ratio, varied colours and noise."""

    min_side: int = 48  # the image's long side is drawn from [min_side, max_side] pixels
    max_side: int = 128
    square: float = 0.3  # probability of a square image; otherwise the aspect ratio is drawn up to max_aspect
    max_aspect: float = 1.5  # long side / short side (the processor pads to a square: shapes shrink with it)
    min_frac: float = 0.10  # shape side as a fraction of the image's short side
    max_frac: float = 0.45
    min_shapes: int = 2  # shapes per image, all of different colour-shape classes
    max_shapes: int = 5
    overlap: float = 0.4  # probability a shape may cover part of earlier ones (otherwise all stay apart)
    max_covered: float = 0.3  # the largest fraction of a shape later shapes may cover
    colour_jitter: int = 24  # each shape's RGB moves up to this much per channel from its colour's value
    min_grey: int = 40  # the background is one grey level drawn from [min_grey, max_grey]
    max_grey: int = 200
    noise: float = 8.0  # per-image Gaussian pixel noise, std drawn from [0, noise]


@dataclass
class SyntheticConfig:
    """What :func:`write_jsonl` and :func:`write_shards` draw: on-grid images by default, free scenes with ``scene``."""

    num_images: int = 2000  # images; each gives num_shapes samples
    image_size: int = 64  # side in pixels (the tiny model's input size: no resampling on load)
    num_shapes: int = 4  # shapes per image, all of different colour-shape classes
    min_size: int = 16  # smallest shape side in pixels
    max_size: int = 24  # largest shape side in pixels
    grid: int = 8  # shapes start at multiples of this (the tiny model's patch size); 1 = anywhere
    canonical: bool = False  # captions "a red circle" only (evaluation), instead of random templates
    region_format: RegionFormat = "rle"  # how regions are stored; "mixed" cycles through all four
    seed: int = 0  # image i is drawn from seed (seed, i), whatever num_images is
    scene: Optional[SceneConfig] = None  # set: free scenes (:mod:`.scenes`); the size/grid fields above are unused


def iter_samples(cfg: SyntheticConfig) -> Iterator[Tuple[int, SyntheticImage, List[Dict[str, object]]]]:
    """Yield ``(image index, image, samples)``; each sample has caption, region, image_caption and label.

    A region of ``{"mask": ...}`` holds the mask's shape index until a writer replaces it with a file name.
    """
    for i in range(cfg.num_images):
        rng = np.random.default_rng([cfg.seed, i])
        if cfg.scene is not None:
            from .scenes import draw_scene

            img = draw_scene(rng, cfg.scene)
        else:
            img = draw_image(rng, cfg.image_size, cfg.num_shapes, cfg.min_size, cfg.max_size, cfg.grid)
        samples = []
        for k, (shape, mask) in enumerate(zip(img.shapes, img.masks)):
            fmt = _FORMATS[(i + k) % len(_FORMATS)] if cfg.region_format == "mixed" else cfg.region_format
            if fmt == "polygon" and shape.occluded:  # the outline would include the covered pixels
                fmt = "rle"
            samples.append({
                "caption": caption_for(shape, None if cfg.canonical else rng),
                "region": _region(fmt, shape, mask, str(k)),
                "image_caption": img.caption,
                "label": shape.label,
            })
        yield i, img, samples


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(directory: Path | str, cfg: SyntheticConfig, manifest: str = "samples.jsonl") -> Path:
    """Write ``images/``, ``masks/`` (for mask regions) and a JSONL manifest with paths relative to it."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, img, samples in iter_samples(cfg):
        name = f"images/{i:06d}.png"
        img.image.save(directory / name)
        for k, sample in enumerate(samples):
            if "mask" in sample["region"]:  # type: ignore[operator]
                mask_name = f"masks/{i:06d}_{k}.png"
                (directory / "masks").mkdir(exist_ok=True)
                Image.fromarray(img.masks[k] * 255).save(directory / mask_name)
                sample["region"] = {"mask": mask_name}
            lines.append(json.dumps({"image": name, **sample}))
    path = directory / manifest
    path.write_text("\n".join(lines) + "\n")
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    directory: Path | str, cfg: SyntheticConfig, samples_per_shard: int = 256, prefix: str = "shard"
) -> List[Path]:
    """Write tar shards in the webdataset layout: ``NNNNNN.png`` + ``NNNNNN.json`` (+ ``NNNNNN.mask.png``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: List[Path] = []
    tar: Optional[tarfile.TarFile] = None
    count = 0
    for i, img, samples in iter_samples(cfg):
        image_bytes = _png(img.image)
        for k, sample in enumerate(samples):
            if count % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                shards.append(directory / f"{prefix}-{len(shards):06d}.tar")
                tar = tarfile.open(shards[-1], "w")
            key = f"{count:09d}"
            if "mask" in sample["region"]:  # type: ignore[operator]
                _add(tar, f"{key}.mask.png", _png(Image.fromarray(img.masks[k] * 255)))
                sample["region"] = {"mask": "mask.png"}
            _add(tar, f"{key}.png", image_bytes)
            _add(tar, f"{key}.json", json.dumps(sample).encode())
            count += 1
    if tar is not None:
        tar.close()
    return shards


def write_example(directory: Path | str, seed: int = 0, label: str = "red circle") -> Tuple[Path, Path, str]:
    """The README's demo: ``shapes.png`` (a 160 x 120 free scene of four shapes) and ``shapes_mask.png``
    (the mask of its ``label`` shape); the first seed from ``seed`` on whose scene holds ``label`` is used.

    Returns:
        (image path, mask path, label of the masked shape).
    """
    from .scenes import draw_scene

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = SceneConfig(min_frac=0.25, max_frac=0.45, min_shapes=4, max_shapes=4, overlap=0.0)
    for s in range(seed, seed + 1000):
        img = draw_scene(np.random.default_rng([s, 0]), cfg, size=(160, 120))
        found = [k for k, shape in enumerate(img.shapes) if shape.label == label]
        if len(img.shapes) == 4 and found:
            break
    else:
        raise ValueError(f"no scene from seed {seed} on holds a {label!r}; pass one of {labels()}")
    image_path, mask_path = directory / "shapes.png", directory / "shapes_mask.png"
    img.image.save(image_path)
    Image.fromarray(img.masks[found[0]] * 255).save(mask_path)
    return image_path, mask_path, label


def dataset_fingerprint(cfg: SyntheticConfig) -> str:
    """A short id of a config, to tell whether data on disk was written with it."""
    return hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
