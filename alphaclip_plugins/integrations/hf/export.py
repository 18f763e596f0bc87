"""Checkpoints of any layout -> transformers models: ``export_hf`` and ``load_alpha_weights``.

Weights come through the core resolver (``core.weights``: read, convert, check, resample) and leave in
the Hugging Face layout (``from_alphaclip(..., "hf")``); sizes are read from the weights and completed
from the architecture table, so any file the core loads becomes a ``save_pretrained`` directory that
``AutoModel`` reads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn
from transformers import CLIPTextConfig, PreTrainedModel

from ...core.config import CLIPConfig, VisionConfig
from ...core.convert import from_alphaclip
from ...core.io import CheckpointError, PathLike, atomic_directory
from ...core.weights import LoadReport, Weights, infer_config, read_weights, resolve
from .configuration import AlphaCLIPConfig, AlphaCLIPVisionConfig
from .modeling import AlphaCLIPModel, AlphaCLIPVisionModel, AlphaCLIPVisionModelWithProjection, vision_body
from .processing import AlphaCLIPImageProcessor

Source = Union[PathLike, nn.Module, Mapping[str, torch.Tensor]]
_CORE_CONFIG = "alphaclip_config.json"  # written by alphaclip_plugins.save_pretrained


def _read(source: Source) -> tuple[Weights, Optional[CLIPConfig]]:
    """Any source -> (canonical weights, its core config where one is known)."""
    if isinstance(source, nn.Module):
        cfg = getattr(source, "cfg", None)
        sd = dict(source.state_dict())
        if isinstance(cfg, VisionConfig):  # a bare core vision tower
            sd, cfg = {"visual." + k: v for k, v in sd.items()}, CLIPConfig(vision=cfg, text=None)
        return read_weights(sd, type(source).__name__), cfg if isinstance(cfg, CLIPConfig) else None
    if isinstance(source, Mapping):
        return read_weights(source), None
    path, cfg = Path(source), None
    if (path / _CORE_CONFIG).is_file():
        cfg = CLIPConfig.from_dict(json.loads((path / _CORE_CONFIG).read_text())["config"])
    return read_weights(path), cfg


def vision_config(config: AlphaCLIPVisionConfig, embed_dim: Optional[int] = None) -> VisionConfig:
    """The core config of a transformers CLIP vision config (``embed_dim`` defaults to its projection_dim)."""
    return VisionConfig(
        image_size=config.image_size, patch_size=config.patch_size, width=config.hidden_size,
        layers=config.num_hidden_layers, heads=config.num_attention_heads, mlp_dim=config.intermediate_size,
        embed_dim=embed_dim or config.projection_dim, act=config.hidden_act, ln_eps=config.layer_norm_eps,
    )


def hf_configs(cfg: CLIPConfig) -> tuple[AlphaCLIPVisionConfig, Optional[CLIPTextConfig]]:
    """A core config as transformers configs (vision, text or None)."""
    v, t = cfg.vision, cfg.text
    vision = AlphaCLIPVisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, projection_dim=v.embed_dim, num_hidden_layers=v.layers,
        num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.act,
        layer_norm_eps=v.ln_eps,
    )
    if t is None:
        return vision, None
    # CLIP pools the text at its end-of-text token, the largest id of the vocabulary.
    text = CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim, projection_dim=t.embed_dim,
        num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
        hidden_act=t.act, layer_norm_eps=t.ln_eps, bos_token_id=t.vocab_size - 2, eos_token_id=t.vocab_size - 1,
    )
    return vision, text


def build_hf_model(source: Source, act: Optional[str] = None) -> PreTrainedModel:
    """An :class:`AlphaCLIPModel` (both towers) or vision-only model holding the weights of ``source``.

    Args:
        source: a checkpoint path (any layout the core reads), a core model, or a state dict.
        act: ``"quick_gelu"`` or ``"gelu"`` when the architecture table does not know the weights
            (OpenAI and official Alpha-CLIP weights are QuickGELU, LAION weights GELU).
    """
    weights, cfg = _read(source)
    cfg = cfg or infer_config(weights, act)
    if act is not None:
        cfg = cfg.replace(vision_act=act, **({"text_act": act} if cfg.text is not None else {}))
    vision, text = hf_configs(cfg)
    sd, _ = resolve(weights, cfg if cfg.text is not None else cfg.vision, strict=False)
    if cfg.text is None:
        sd = {"visual." + k: v for k, v in sd.items()}
    if text is not None and "logit_scale" in sd:
        model: PreTrainedModel = AlphaCLIPModel(AlphaCLIPConfig(
            vision_config=vision, text_config=text, projection_dim=vision.projection_dim,
            logit_scale_init_value=float(sd["logit_scale"]),
        ))
    elif "visual.proj" in weights.state_dict:
        model = AlphaCLIPVisionModelWithProjection(vision)
    else:
        model = AlphaCLIPVisionModel(vision)
    _load_hf(model, from_alphaclip(sd, "hf"), weights.source)
    return model.to(weights.state_dict["visual.conv1.weight"].dtype).eval()


def _load_hf(model: PreTrainedModel, hf: Mapping[str, torch.Tensor], source: str) -> None:
    """Load HF-layout weights (``vision_model.*`` ...) into ``model``, strictly, on every transformers release.

    A bare tower (``AlphaCLIPVisionModel``) loads into its body (``vision_body``), whose keys have no
    ``vision_model.`` prefix whether the release wraps the body (4.x) or not (5.x); a vision model takes no
    text tower.
    """
    if isinstance(model, AlphaCLIPVisionModel):
        target = vision_body(model)
        hf = {k[len("vision_model."):]: v for k, v in hf.items() if k.startswith("vision_model.")}
    else:
        target = model
        if not isinstance(model, AlphaCLIPModel):
            hf = {k: v for k, v in hf.items() if k.startswith(("vision_model.", "visual_projection."))}
    own = target.state_dict()
    missing = [k for k in own if k not in hf]
    unexpected = [k for k in hf if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: missing {missing[:4] or 'nothing'}, "
                              f"unexpected {unexpected[:4] or 'nothing'}")
    target.load_state_dict(hf, strict=True)


def export_hf(
    model_or_checkpoint: Source, out_dir: PathLike, act: Optional[str] = None, overwrite: bool = False
) -> PreTrainedModel:
    """Write a transformers model directory (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).

    Two towers become an :class:`AlphaCLIPModel` (``AutoModel.from_pretrained`` loads it); a vision tower
    alone (e.g. an official Alpha-CLIP ``.pth``) an :class:`AlphaCLIPVisionModelWithProjection` (load it with
    that class: ``AutoModel`` gives the tower without its projection). ``AutoImageProcessor.from_pretrained``
    reads the processor. Import ``alphaclip_plugins.integrations.hf`` first: it registers the classes.

    Args:
        model_or_checkpoint: a checkpoint path (file or directory, any layout), a core model or a state dict.
        out_dir: the directory to write.
        act: activation override, see :func:`build_hf_model`.
        overwrite: replace an existing ``out_dir`` (whole: no file of an earlier export stays).

    Returns:
        The exported model (in the checkpoint's dtype).
    """
    model = build_hf_model(model_or_checkpoint, act=act)
    vision = getattr(model.config, "vision_config", model.config)
    with atomic_directory(out_dir, overwrite, marker="config.json") as tmp:  # all-or-nothing
        model.save_pretrained(tmp)
        AlphaCLIPImageProcessor(image_size=vision.image_size).save_pretrained(tmp)
    return model


def load_alpha_weights(
    tower: AlphaCLIPVisionModel, checkpoint: Union[PathLike, Mapping[str, torch.Tensor]]
) -> LoadReport:
    """Load an Alpha-CLIP vision checkpoint (any layout, e.g. an official ``.pth``) into an HF tower, in place.

    The checkpoint goes through the core resolver: positional embeddings of another grid are resized
    (bicubic), a plain CLIP file leaves a zero alpha conv, and the architecture is checked. A projection
    in the file is ignored: a bare tower has none.

    Returns:
        The core ``LoadReport``; ``new_alpha`` is True when the file had no alpha conv (plain CLIP weights).

    Raises:
        CheckpointError: the checkpoint has no vision tower, or one of another width, depth or patch size.
    """
    weights = read_weights(checkpoint)
    target = vision_config(tower.config, embed_dim=int(weights.facts().get("embed_dim") or 0) or None)
    sd, report = resolve(weights, target, strict=False)
    report.check(allow_missing=("proj",))  # a bare tower has no projection
    _load_hf(tower, from_alphaclip({"visual." + k: v for k, v in sd.items() if k != "proj"}, "hf"), report.source)
    return report
