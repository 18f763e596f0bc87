"""``create_model``, ``save_pretrained`` / ``from_pretrained`` and the tokenizer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Literal, Optional, Sequence, Union

import torch

from .checkpoint import load_checkpoint
from .config import CLIPConfig, get_config
from .io import CheckpointError, PathLike, atomic_directory, save_safetensors, write_json
from .model import AlphaCLIP
from .weights import check_architecture, match_architecture, read_weights

Precision = Literal["fp32", "fp16", "bf16"]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CONFIG_NAME = "alphaclip_config.json"
WEIGHTS_NAME = "model.safetensors"
#: The embedded demo model: a tiny Alpha-CLIP trained on synthetic shapes (see the README).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-shapes"


def create_model(
    name: Optional[str] = "ViT-B/16",
    pretrained: Optional[PathLike] = None,
    alpha_checkpoint: Optional[PathLike] = None,
    *,
    strict: bool = True,
    precision: Precision = "fp32",
    device: Union[str, torch.device, None] = None,
    seed: int = 0,
    **overrides: Any,
) -> AlphaCLIP:
    """Build an Alpha-CLIP model, optionally with weights.

    Args:
        name: an architecture (``"ViT-B/16"``, ``"ViT-L-14-336"``, ``"tiny"``...), or None to infer it
            from ``pretrained``.
        pretrained: a CLIP checkpoint for both towers: OpenAI (``ViT-B-16.pt``), open_clip, Hugging Face
            (file or directory), timm, or a directory written by :func:`save_pretrained`.
        alpha_checkpoint: an Alpha-CLIP vision tower (the official ``clip_*_grit*.pth`` files, or any
            layout above) loaded over the vision tower after ``pretrained``.
        strict: refuse files that leave weights unset or carry extra ones (a plain CLIP file's missing
            alpha conv is expected and stays zero).
        precision: parameter dtype. Inputs are cast to it, so callers never cast.
        seed: seed of the random initialisation (weights a file does not set stay reproducible).
        **overrides: config fields, e.g. ``vision_image_size=448`` (``CLIPConfig.replace``).

    Loads go through the one resolver (``core.weights.resolve``); to see what a load did (the layout,
    whether the alpha conv was new), call :func:`load_checkpoint` yourself: it returns a ``LoadReport``.
    """
    if pretrained is not None and Path(pretrained, CONFIG_NAME).exists() and name is None:
        return from_pretrained(pretrained, precision=precision, device=device)
    weights = read_weights(pretrained) if pretrained is not None else None  # read once, also to infer the name
    if name is None:
        if weights is None:
            raise ValueError("pass an architecture name or a pretrained checkpoint to infer it from")
        name = match_architecture(weights.facts())
        if name is None:
            raise CheckpointError(f"{pretrained} holds no known architecture ({weights.facts()}); pass the architecture name")
    cfg = get_config(name).replace(**overrides)
    tower = read_weights(alpha_checkpoint) if alpha_checkpoint is not None else None
    # Files of another architecture fail here, before memory goes to a model they cannot fill.
    for w in filter(None, (weights, tower)):
        check_architecture(cfg if w is weights else CLIPConfig(vision=cfg.vision, text=None), w.state_dict, w.source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AlphaCLIP(cfg)
    if weights is not None:
        load_checkpoint(model, weights, strict=strict)
    if tower is not None:
        load_checkpoint(model.visual, tower, strict=strict)
    return model.to(device=device, dtype=_DTYPES[precision]).eval()


def save_pretrained(
    model: AlphaCLIP, directory: PathLike, overwrite: bool = False, labels: Optional[Sequence[str]] = None
) -> None:
    """Write ``model.safetensors`` and ``alphaclip_config.json`` into ``directory``, all-or-nothing.

    The files are written into a temporary sibling that is renamed into place, so a failure leaves no new
    weights beside an old config. An existing ``directory`` is replaced whole, and only with ``overwrite=True``.

    Args:
        labels: class names that belong with the model (its default vocabulary, see :func:`model_labels`).
    """
    meta = {"config": model.cfg.to_dict(), "library": "alphaclip-plugins"}
    if labels is not None:
        meta["labels"] = list(labels)
    with atomic_directory(directory, overwrite, marker=CONFIG_NAME) as tmp:
        save_safetensors(model.state_dict(), tmp / WEIGHTS_NAME, metadata={"format": "alphaclip"})
        write_json(meta, tmp / CONFIG_NAME)


def model_labels(directory: PathLike = DEFAULT_MODEL_DIR) -> List[str]:
    """The class names saved with a :func:`save_pretrained` directory (by default the embedded model's:
    ``"colour shape"`` for every colour and shape it was trained on); empty if none were saved."""
    return list(json.loads((Path(directory) / CONFIG_NAME).read_text()).get("labels", []))


def from_pretrained(
    directory: PathLike, precision: Precision = "fp32", device: Union[str, torch.device, None] = None
) -> AlphaCLIP:
    """Load a directory written by :func:`save_pretrained`."""
    directory = Path(directory)
    cfg_file = directory / CONFIG_NAME
    if not cfg_file.exists():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; was it written by save_pretrained?")
    cfg = CLIPConfig.from_dict(json.loads(cfg_file.read_text())["config"])
    model = AlphaCLIP(cfg)
    load_checkpoint(model, directory / WEIGHTS_NAME)
    return model.to(device=device, dtype=_DTYPES[precision]).eval()


def resolve_model(spec: Union[str, PathLike, dict, AlphaCLIP] = "default") -> AlphaCLIP:
    """A model from a config-file friendly spec: ``"default"`` (the embedded model), a directory written by
    :func:`save_pretrained`, a checkpoint path (architecture inferred), or ``create_model`` keyword arguments."""
    if isinstance(spec, AlphaCLIP):
        return spec
    if isinstance(spec, dict):
        return create_model(**spec)
    if spec == "default":
        if not (DEFAULT_MODEL_DIR / CONFIG_NAME).exists():
            raise FileNotFoundError(
                f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; reinstall alphaclip-plugins, or "
                f"train it with: alphaclip train configs/train/tiny_shapes.yaml"
            )
        return from_pretrained(DEFAULT_MODEL_DIR)
    return create_model(None, pretrained=spec)


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77) -> torch.Tensor:
    """CLIP's BPE tokenizer (open_clip's): ``[N, context_length]`` int64 token ids, truncated with EOT kept."""
    from open_clip.tokenizer import SimpleTokenizer

    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = SimpleTokenizer()
    return _TOKENIZER([texts] if isinstance(texts, str) else list(texts), context_length=context_length)


_TOKENIZER: Any = None
