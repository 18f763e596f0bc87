"""Loading any supported checkpoint into a core model, and exporting one to any layout.

Loading goes through :func:`alphaclip_plugins.core.weights.resolve`, the one way in.
"""
from __future__ import annotations

from typing import Mapping, Union

import torch
from torch import nn

from .config import CLIPConfig, VisionConfig
from .convert import StateDict, from_alphaclip
from .io import PathLike, save_safetensors, save_torch
from .weights import LoadReport, Source, Target, Weights, resolve


def model_target(model: nn.Module) -> Target:
    """The architecture a core model (``AlphaCLIP``) or bare tower (``VisionTransformer``) was built for."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, (CLIPConfig, VisionConfig)):
        raise TypeError(
            f"{type(model).__name__} is not a core Alpha-CLIP model or vision tower; framework models load "
            f"through their own adapters (alphaclip_plugins.integrations)"
        )
    return cfg


def load_checkpoint(
    model: nn.Module, source: Union[Source, Weights], strict: bool = True
) -> LoadReport:
    """Load ``source`` (a path of any supported layout, file or directory, or a state dict) into ``model``.

    ``model`` is an ``AlphaCLIP`` (both towers) or its ``VisionTransformer`` (``model.visual``): a tower
    takes the vision weights of any file, full CLIP files included.

    Raises:
        CheckpointError: unreadable file, another architecture, or (strict) missing / unexpected keys, named.
    """
    sd, report = resolve(source, model_target(model), strict=strict)
    model.load_state_dict(sd, strict=False)
    return report


def export_state_dict(model: nn.Module, fmt: str) -> StateDict:
    """The model's weights in layout ``fmt`` (``alphaclip``, ``official``, ``hf``, ``timm``, ``open_clip``)."""
    sd = model.state_dict()
    if isinstance(model_target(model), VisionConfig):  # a bare vision tower
        sd = {"visual." + k: v for k, v in sd.items()}
    return from_alphaclip(sd, fmt)


def save_official(model: nn.Module, path: PathLike) -> None:
    """Write the vision tower as the original Alpha-CLIP code reads it (a ``.pth`` of tensors)."""
    save_torch(export_state_dict(model, "official"), path)


def save_weights(model_or_sd: Union[nn.Module, Mapping[str, torch.Tensor]], path: PathLike,
                 fmt: str = "alphaclip") -> None:
    """Write weights in layout ``fmt`` to ``path``: safetensors unless the name ends in ``.pt``/``.pth``/``.bin``
    (the official layout is always a ``.pth`` of tensors, as the original code reads it).

    Args:
        model_or_sd: a core model, or a canonical-layout state dict.
    """
    if isinstance(model_or_sd, nn.Module):
        sd = export_state_dict(model_or_sd, fmt)
    else:
        sd = from_alphaclip(model_or_sd, fmt)
    if fmt == "official" or str(path).endswith((".pt", ".pth", ".bin")):
        save_torch(sd, path)
    else:
        save_safetensors(sd, path)
