"""Open-vocabulary detection pieces shared by the detection integrations (MMDetection, Detectron2).

* :class:`ZeroShotClassifier`: a box classifier whose class weights are Alpha-CLIP text embeddings;
* :class:`RegionScorer` and :class:`DetectionRescorer` (in :mod:`.rescore`): encode the full image with
  each detected box (or mask) as alpha and fuse the result with the detector's score, as ViLD / F-VLM
  do; :func:`backbone_clip_spec`: the scorer's CLIP from the backbone's architecture and weights;
* :func:`swap_vocabulary`: point a built detector at other classes.

The integrations only translate their frameworks' boxes, images and configs to these.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.factory import resolve_model
from ..core.io import CheckpointError
from ..core.zeroshot import Templates, load_text_embeddings, save_text_embeddings
from .rescore import (
    DetectionRescorer, RegionMode, RegionScorer, Rescored, clip_boxes, crop_region, fuse_detections, fuse_scores,
)

__all__ = ["DetectionRescorer", "RegionMode", "RegionScorer", "Rescored", "crop_region", "ZeroShotClassifier", "backbone_clip_spec", "scorer_model",
           "cached_text_embeddings",
           "clip_boxes", "fuse_detections", "fuse_scores", "swap_classifier_vocabulary", "swap_vocabulary"]


def cached_text_embeddings(
    path: Union[str, Path], class_names: Optional[Sequence[str]] = None, clip: Any = "default",
    templates: Templates = "ovseg",
) -> Tuple[torch.Tensor, list]:
    """``(embeddings [K, D], labels)`` read from ``path``; computed with ``clip`` and written there if missing."""
    path = Path(path)
    if path.exists():
        emb, labels = load_text_embeddings(path)
        if class_names is not None and list(class_names) != labels:
            raise ValueError(f"{path} holds embeddings of other classes ({labels[:5]}...); delete it to recompute")
        return emb, labels
    if class_names is None:
        raise FileNotFoundError(f"{path} does not exist; pass class_names (and clip) to compute it")
    return save_text_embeddings(resolve_model(clip), class_names, path, templates), list(class_names)


def backbone_clip_spec(
    arch: str, checkpoint: Optional[str] = None, text_checkpoint: Optional[str] = None, **vision: Any,
) -> dict:
    """``create_model`` keyword arguments of a CLIP with the backbone's architecture and weights: what a
    re-scorer configured as ``clip="backbone"`` is built from.

    Args:
        arch: the backbone's architecture (``"ViT-B/16"``...).
        checkpoint: the backbone's initial weights, any layout the core reads. A full CLIP file gives
            both towers; a vision tower only (the official Alpha-CLIP ``.pth``) needs ``text_checkpoint``.
        text_checkpoint: the matching CLIP file (e.g. OpenAI ``ViT-B-16.pt``), for the text tower.
        **vision: vision config fields the backbone overrides (``layers``, ``patch_size``...);
            ``image_size`` is not taken: the scorer sees whole images at CLIP's own size.
    """
    spec: dict = dict(name=arch, **{f"vision_{k}": v for k, v in vision.items() if k != "image_size"})
    if not checkpoint and not text_checkpoint:
        warnings.warn(f"the re-scorer's {arch} CLIP has random weights: the backbone has no initial checkpoint; "
                      f"give the backbone one, or configure the scorer's clip", stacklevel=2)
    if text_checkpoint:
        spec.update(pretrained=text_checkpoint, alpha_checkpoint=checkpoint or None)
    elif checkpoint:
        spec.update(pretrained=checkpoint)
    return spec


def scorer_model(spec: Any) -> nn.Module:
    """The re-scorer's CLIP from a ``resolve_model`` spec: frozen and in eval mode.

    Raises:
        ValueError: a ``backbone_clip_spec`` whose checkpoint is a vision tower only (no text tower).
    """
    try:
        model = resolve_model(spec)
    except CheckpointError as e:
        if isinstance(spec, dict) and not spec.get("alpha_checkpoint") and "token_embedding" in str(e):
            raise ValueError(f"{spec.get('pretrained')} holds a vision tower only, but the re-scorer also needs "
                             f"CLIP's text tower: give the matching CLIP file (e.g. ViT-B-16.pt) as the scorer's "
                             f"text_checkpoint (mmdet) or MODEL.ALPHACLIP.CLIP_TEXT_CHECKPOINT (detectron2)") from e
        raise
    return model.eval().requires_grad_(False)


def _text_embed_dim(clip: Any) -> Optional[int]:
    """The text embedding size of the CLIP that the ``resolve_model`` spec ``clip`` names, from its config
    alone (no weights are read); None when only its weights can tell (a checkpoint path)."""
    from ..core.config import CLIPConfig, get_config
    from ..core.factory import CONFIG_NAME, DEFAULT_MODEL_DIR

    if isinstance(clip, nn.Module):
        cfg = clip.cfg
    elif isinstance(clip, dict):
        if clip.get("name", "ViT-B/16") is None:
            return None
        args = ("name", "pretrained", "alpha_checkpoint", "strict", "precision", "device", "seed")
        cfg = get_config(clip.get("name", "ViT-B/16")).replace(**{k: v for k, v in clip.items() if k not in args})
    else:
        config = (DEFAULT_MODEL_DIR if clip == "default" else Path(clip)) / CONFIG_NAME
        if not config.is_file():
            return None
        cfg = CLIPConfig.from_dict(json.loads(config.read_text())["config"])
    return (cfg.text or cfg.vision).embed_dim


class ZeroShotClassifier(nn.Module):
    """Box classifier whose class weights are Alpha-CLIP text embeddings, plus a learned background.

    ``scores = logit_scale * cos(proj(x), [text_1..K; background])``: ``[N, K + 1]``, background last,
    as MMDetection's and Detectron2's box heads expect. The vocabulary can be swapped at inference.

    Args:
        in_features: box feature size.
        out_features: classes + 1 (background); must agree with the embedding file.
        text_embeddings: file written by ``alphaclip vocab`` / ``save_text_embeddings``, read at build. The
            embeddings are a buffer of the detector's state dict, so a checkpoint's own vocabulary replaces
            the file's when it is loaded. If the file is missing, the buffer waits (zeros) and is computed
            with ``clip`` and written to the file only when first needed: at ``init_weights``, the first
            forward or :meth:`compute_embeddings`, and only if no state dict loaded it meanwhile, so a
            detector loaded from its checkpoint never builds the CLIP. (A ``clip`` whose embedding size only
            its weights tell, a bare checkpoint path, is loaded at build as before.)
        class_names, clip, templates: what to compute that file from.
        logit_scale: inverse temperature of the cosine logits.
    """

    def __init__(
        self, in_features: int, out_features: int, text_embeddings: Union[str, Path],
        class_names: Optional[Sequence[str]] = None, clip: Any = "default", templates: Templates = "ovseg",
        logit_scale: float = 50.0,
    ):
        super().__init__()
        dim = None if Path(text_embeddings).exists() or class_names is None else _text_embed_dim(clip)
        self._pending: Optional[tuple] = None  # what compute_embeddings computes the buffer from
        if dim is None:
            emb, labels = cached_text_embeddings(text_embeddings, class_names, clip, templates)
        else:
            emb, labels = torch.zeros(len(class_names), dim), list(class_names)
            self._pending = (text_embeddings, clip, templates)
        if out_features != len(labels) + 1:
            raise ValueError(f"{text_embeddings} holds {len(labels)} classes but the head has "
                             f"{out_features - 1}; make the head's number of classes agree")
        self.proj = nn.Linear(in_features, emb.shape[1])
        self.background = nn.Parameter(torch.randn(emb.shape[1]) * 0.02)
        # Saved with the detector: a checkpoint serves its vocabulary without the file.
        self.register_buffer("text_embeddings", F.normalize(emb.float(), dim=-1))
        self.logit_scale = logit_scale
        self.labels = labels

    def set_vocabulary(self, embeddings: torch.Tensor, labels: Sequence[str]) -> None:
        if embeddings.shape[1] != self.proj.out_features:
            raise ValueError(f"embeddings have dim {embeddings.shape[1]} but the classifier {self.proj.out_features}")
        self.text_embeddings = F.normalize(embeddings.float(), dim=-1).to(self.proj.weight.device)
        self.labels = list(labels)
        self._pending = None

    def compute_embeddings(self) -> None:
        """Fill the class embeddings if neither the file nor a loaded state dict gave them: read the file if
        it appeared since the build, else compute them with the CLIP and write the file."""
        if self._pending is None:
            return
        path, clip, templates = self._pending
        try:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, even under inference mode
                emb, _ = cached_text_embeddings(path, self.labels, clip, templates)
        except (FileNotFoundError, CheckpointError) as e:
            raise FileNotFoundError(
                f"the zero-shot classifier has no class embeddings: {path} does not exist and no checkpoint "
                f"loaded them, and the CLIP {clip!r} to compute them cannot be loaded ({e}); load the detector's "
                f"checkpoint, write the file with `alphaclip vocab`, or point the classifier's clip at a CLIP") from e
        self.set_vocabulary(emb, self.labels)

    def init_weights(self) -> None:
        """Called by MMEngine before training: the embeddings are computed now, not at the first step."""
        self.compute_embeddings()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        loaded = state_dict.get(prefix + "text_embeddings")
        # A state dict saved before they were computed holds the zeros: they still wait.
        if loaded is not None and loaded.shape == self.text_embeddings.shape and bool(loaded.abs().sum(-1).all()):
            self._pending = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:  # module state, not data: the same on every call after the first
            self.compute_embeddings()
        x = F.normalize(self.proj(x.flatten(1)), dim=-1)
        weights = torch.cat([self.text_embeddings, F.normalize(self.background, dim=0)[None]])  # [K + 1, D]
        return self.logit_scale * x @ weights.T


def swap_classifier_vocabulary(model: nn.Module, text_embeddings: Union[str, Path]) -> Tuple[list, int]:
    """Point every :class:`ZeroShotClassifier` inside ``model`` at the classes of ``text_embeddings``.

    Returns:
        ``(labels, number of classifiers swapped)``; the caller updates its framework's class counts.
    """
    emb, labels = load_text_embeddings(text_embeddings)
    classifiers = [m for m in model.modules() if isinstance(m, ZeroShotClassifier)]
    for m in classifiers:
        m.set_vocabulary(emb, labels)
    return labels, len(classifiers)


def swap_vocabulary(
    model: nn.Module, text_embeddings: Union[str, Path], novel_classes: Sequence[str] = (),
    heads: Callable[[nn.Module], bool] = lambda m: False,
) -> list:
    """Point a built detector at the classes of ``text_embeddings``, in place.

    Every :class:`ZeroShotClassifier` gets the new class embeddings, every module ``heads`` selects gets
    the new ``num_classes``, and every ``rescorer`` (:class:`DetectionRescorer`) the new labels.

    Returns:
        The new labels.

    Raises:
        ValueError: the model has neither a zero-shot classifier nor a re-scorer.
    """
    labels, found = swap_classifier_vocabulary(model, text_embeddings)
    for module in model.modules():
        if heads(module):
            module.num_classes = len(labels)
        rescorer = getattr(module, "rescorer", None)
        if isinstance(rescorer, DetectionRescorer):
            rescorer.set_vocabulary(labels, novel_classes)
            found += 1
    if not found:
        raise ValueError("the detector has no ZeroShotClassifier or Alpha-CLIP re-scorer whose vocabulary to swap")
    return labels
