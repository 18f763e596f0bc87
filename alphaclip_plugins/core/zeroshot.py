"""Zero-shot region classification: text classifier weights from class names x prompt templates."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .alpha import check_alpha
from .factory import tokenize
from .processor import RegionProcessor

#: Built-in prompt sets: CLIP's single template and OVSeg's 14-template ensemble.
TEMPLATES: Dict[str, Tuple[str, ...]] = {
    "clip": ("a photo of a {}.",),
    "ovseg": (
        "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene", "There is the {} in the scene",
        "a photo of a {} in the scene", "a photo of a small {}.", "a photo of a medium {}.",
        "a photo of a large {}.", "This is a photo of a small {}.", "This is a photo of a medium {}.",
        "This is a photo of a large {}.", "There is a small {} in the scene.",
        "There is a medium {} in the scene.", "There is a large {} in the scene.",
    ),
}

Templates = Union[str, Sequence[str]]


def _prompts(templates: Templates) -> Tuple[str, ...]:
    """A prompt set's name or a list of templates -> templates, each with exactly one ``{}`` for the class."""
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            raise ValueError(f"unknown prompt set {templates!r}; use one of {sorted(TEMPLATES)} or a list of "
                             f"templates such as ['a photo of a {{}}.']")
        return TEMPLATES[templates]
    prompts = tuple(templates)
    bad = [t for t in prompts if not isinstance(t, str) or t.count("{}") != 1 or t.replace("{}", "").count("{")]
    if not prompts or bad:
        raise ValueError(f"each template needs exactly one '{{}}' where the class name goes (and no other braces); "
                         f"got {bad[:3] if bad else 'no templates'}")
    return prompts


def _labels(labels: Sequence[str]) -> Tuple[str, ...]:
    if isinstance(labels, str):
        raise ValueError(f"labels must be a list of class names, not one string ({labels!r} would become "
                         f"{len(labels)} one-letter classes); pass [{labels!r}]")
    labels = tuple(labels)
    if not labels:
        raise ValueError("labels is empty; pass at least one class name")
    if not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValueError(f"every label must be a non-empty string; got {[x for x in labels if not isinstance(x, str) or not x.strip()][:3]}")
    return labels


@torch.no_grad()
def text_classifier(
    model: nn.Module, labels: Sequence[str], templates: Templates = "ovseg", batch_size: int = 256,
    progress: Optional[bool] = None,
) -> torch.Tensor:
    """Normalised class embeddings ``[K, embed_dim]``: each class's prompt embeddings, averaged.

    Nothing is cached: callers that score many images against one vocabulary keep the result (as
    :class:`~alphaclip_plugins.detection.open_vocab.RegionScorer` does, or pass it to
    :func:`classify_regions` as ``classifier``). ``progress`` shows a bar (by default when there are
    more than 4 batches of prompts).
    """
    prompts, labels = _prompts(templates), _labels(labels)
    texts = [t.format(label) for label in labels for t in prompts]
    device = model.token_embedding.weight.device
    chunks = range(0, len(texts), batch_size)
    if progress or (progress is None and len(chunks) > 4):
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="text classifier", unit="batch")
    ctx = model.context_length
    emb = torch.cat([model.encode_text(tokenize(texts[i : i + batch_size], ctx).to(device), normalize=True)
                     for i in chunks])
    # [K * T, D] -> [K, T, D] -> class mean -> renormalise
    return F.normalize(emb.float().view(len(labels), len(prompts), -1).mean(dim=1), dim=-1)


@torch.no_grad()
def classify_regions(
    model: nn.Module, image: Any, regions: Optional[Sequence[Any]], labels: Sequence[str],
    templates: Templates = "ovseg", processor: Optional[RegionProcessor] = None,
    classifier: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Zero-shot probabilities of each region of one image over ``labels``.

    The image is preprocessed and embedded once; all regions run as one batch that shares it.

    Args:
        image: PIL, numpy ``[H, W, 3]`` or torch ``[3, H, W]``.
        regions: masks, boxes, polygons, RLEs (see ``regions.py``); None = the whole image.
        labels: class names.
        templates: ``"ovseg"``, ``"clip"`` or a list of ``"... {} ..."`` strings.
        processor: geometry and size; defaults to pad-to-square at the model's input size.
        classifier: ``text_classifier(model, labels, templates)`` computed once by the caller, for many
            images; computed here when None.

    Returns:
        ``[R, K]`` probabilities (softmax over classes of ``logit_scale * cosine``).
    """
    processor = processor or RegionProcessor(model.visual.cfg.image_size)
    pixels, size = processor.pixels(image)
    alpha = processor.alphas(list(regions) if regions is not None else [None], size)
    check_alpha(alpha)  # a custom processor's alphas are user data: check them once, here
    device = model.logit_scale.device
    feats = model.encode_image(pixels.to(device), alpha.to(device), normalize=True).float()
    weights = classifier if classifier is not None else text_classifier(model, labels, templates)
    return (model.logit_scale.exp().float() * feats @ weights.T).softmax(dim=-1)


def save_text_embeddings(
    model: nn.Module, labels: Sequence[str], path: Union[str, "os.PathLike[str]"], templates: Templates = "ovseg"
) -> torch.Tensor:
    """Compute class embeddings and write them with their labels to a safetensors file (atomically).

    Detection heads read this file, so they need no text tower at train or test time.
    """
    from .io import save_safetensors

    weights = text_classifier(model, labels, templates)
    prompts = TEMPLATES[templates] if isinstance(templates, str) else list(templates)
    meta = {"labels": json.dumps(list(labels)), "templates": json.dumps(list(prompts))}
    save_safetensors({"embeddings": weights}, path, metadata=meta)
    return weights


def load_text_embeddings(path: Union[str, "os.PathLike[str]"]) -> Tuple[torch.Tensor, list]:
    """Read a file written by :func:`save_text_embeddings`: ``(embeddings [K, D], labels)``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "labels" not in meta or "embeddings" not in f.keys():
            raise ValueError(f"{path} is not a text-embedding file; write one with save_text_embeddings")
        return f.get_tensor("embeddings"), json.loads(meta["labels"])
