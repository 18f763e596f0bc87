"""Checkpoints of any layout -> transformers models: ``export_hf`` and ``load_alpha_weights``.

Weights go through the core converters (``read_state_dict`` -> ``to_alphaclip`` -> ``alphaclip_to_hf``);
sizes are read from the weights (``describe``) and completed from the architecture table, so any file
the core loads becomes a ``save_pretrained`` directory that ``AutoModel`` reads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn
from transformers import CLIPTextConfig, PreTrainedModel

from ...core.checkpoint import LoadResult, describe, match_architecture
from ...core.config import ARCHITECTURES, CLIPConfig, TextConfig, VisionConfig
from ...core.convert import alphaclip_to_hf, detect_format, strip_prefix, to_alphaclip
from ...core.io import CheckpointError, PathLike, read_state_dict
from ...core.vision import resample_pos_embed
from .configuration import AlphaCLIPConfig, AlphaCLIPVisionConfig
from .modeling import AlphaCLIPModel, AlphaCLIPVisionModel, AlphaCLIPVisionModelWithProjection, vision_body
from .processing import AlphaCLIPImageProcessor

Source = Union[PathLike, nn.Module, Mapping[str, torch.Tensor]]
_CORE_CONFIG = "alphaclip_config.json"  # written by alphaclip_plugins.save_pretrained


def _canonical(source: Source) -> tuple[Dict[str, torch.Tensor], Optional[CLIPConfig]]:
    """Any source -> (canonical-layout state dict, its core config where one is known)."""
    cfg = None
    if isinstance(source, nn.Module):
        cfg = getattr(source, "cfg", None)
        sd = dict(source.state_dict())
        if isinstance(cfg, VisionConfig):  # a bare core vision tower
            sd, cfg = {"visual." + k: v for k, v in sd.items()}, CLIPConfig(vision=cfg, text=None)
        return to_alphaclip(sd), cfg if isinstance(cfg, CLIPConfig) else None
    if isinstance(source, Mapping):
        return to_alphaclip(source), None
    path = Path(source)
    if (path / _CORE_CONFIG).is_file():
        cfg = CLIPConfig.from_dict(json.loads((path / _CORE_CONFIG).read_text())["config"])
    return to_alphaclip(read_state_dict(path)), cfg


def _infer_config(sd: Mapping[str, torch.Tensor], cfg: Optional[CLIPConfig], act: Optional[str]) -> CLIPConfig:
    """Complete what the weights say (widths, depths, sizes) with heads and activation from the table."""
    facts = describe(sd)
    if "vision_width" not in facts:
        raise CheckpointError("the checkpoint has no vision tower (no 'visual.conv1.weight' after conversion)")
    if cfg is None:
        name = match_architecture(facts)
        base = ARCHITECTURES[name] if name else CLIPConfig()
        width, text_width = facts["vision_width"], facts.get("text_width")
        vision = VisionConfig(
            image_size=facts["image_size"], patch_size=facts["patch_size"], width=width,
            layers=facts["vision_layers"], mlp_dim=facts["vision_mlp_dim"],
            heads=base.vision.heads if name else max(1, width // 64),  # OpenAI/open_clip ViTs: 64-wide heads
            embed_dim=facts.get("embed_dim") or width, act=base.vision.act,
        )
        text = None
        if text_width is not None:
            text = TextConfig(
                context_length=facts["context_length"], vocab_size=facts["vocab_size"], width=text_width,
                layers=facts["text_layers"], heads=base.text.heads if name else max(1, text_width // 64),
                embed_dim=vision.embed_dim, act=base.vision.act,
            )
        cfg = CLIPConfig(vision=vision, text=text)
    if act is not None:
        cfg = cfg.replace(vision_act=act, **({"text_act": act} if cfg.text is not None else {}))
    return cfg


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
    sd, cfg = _canonical(source)
    cfg = _infer_config(sd, cfg, act)
    vision, text = hf_configs(cfg)
    has_proj = "visual.proj" in sd
    if text is not None and "logit_scale" in sd:
        model: PreTrainedModel = AlphaCLIPModel(AlphaCLIPConfig(
            vision_config=vision, text_config=text, projection_dim=vision.projection_dim,
            logit_scale_init_value=float(sd["logit_scale"]),
        ))
    elif has_proj:
        model = AlphaCLIPVisionModelWithProjection(vision)
    else:
        model = AlphaCLIPVisionModel(vision)
    hf = alphaclip_to_hf(sd)
    if isinstance(model, AlphaCLIPVisionModel):
        hf = {k[len("vision_model."):]: v for k, v in hf.items() if k.startswith("vision_model.")}
    elif not isinstance(model, AlphaCLIPModel):
        hf = {k: v for k, v in hf.items() if k.startswith(("vision_model.", "visual_projection."))}
    target = vision_body(model) if isinstance(model, AlphaCLIPVisionModel) else model  # a bare tower's own keys
    missing, unexpected = target.load_state_dict(hf, strict=False)
    missing = [k for k in missing if not k.endswith("patch_embedding_alpha.weight")]  # plain CLIP: stays zero
    if missing or unexpected:
        raise CheckpointError(
            f"the converted checkpoint does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    return model.to(sd["visual.conv1.weight"].dtype).eval()


def export_hf(model_or_checkpoint: Source, out_dir: PathLike, act: Optional[str] = None) -> PreTrainedModel:
    """Write a transformers model directory (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).

    Two towers become an :class:`AlphaCLIPModel` (``AutoModel.from_pretrained`` loads it); a vision tower
    alone (e.g. an official Alpha-CLIP ``.pth``) an :class:`AlphaCLIPVisionModelWithProjection` (load it with
    that class: ``AutoModel`` gives the tower without its projection). ``AutoImageProcessor.from_pretrained``
    reads the processor. Import ``alphaclip_plugins.integrations.hf`` first: it registers the classes.

    Args:
        model_or_checkpoint: a checkpoint path (file or directory, any layout), a core model or a state dict.
        out_dir: the directory to write.
        act: activation override, see :func:`build_hf_model`.

    Returns:
        The exported model (in the checkpoint's dtype).
    """
    model = build_hf_model(model_or_checkpoint, act=act)
    model.save_pretrained(out_dir)
    vision = getattr(model.config, "vision_config", model.config)
    AlphaCLIPImageProcessor(image_size=vision.image_size).save_pretrained(out_dir)
    return model


def load_alpha_weights(
    tower: AlphaCLIPVisionModel, checkpoint: Union[PathLike, Mapping[str, torch.Tensor]]
) -> LoadResult:
    """Load an Alpha-CLIP vision checkpoint (any layout, e.g. an official ``.pth``) into an HF tower, in place.

    Positional embeddings of another grid are resized (bicubic). A projection in the file is ignored:
    a bare tower has none.

    Returns:
        The core ``LoadResult``; ``new_alpha`` is True when the file had no alpha conv (plain CLIP weights).

    Raises:
        CheckpointError: the checkpoint has no vision tower, or one of another width, depth or patch size.
    """
    source = "the state dict" if isinstance(checkpoint, Mapping) else str(checkpoint)
    raw = strip_prefix(checkpoint if isinstance(checkpoint, Mapping) else read_state_dict(checkpoint), "module.")
    vis = {k: v for k, v in to_alphaclip(raw).items() if k.startswith("visual.")}
    if "visual.conv1.weight" not in vis:
        raise CheckpointError(f"{source} holds no vision tower")
    body = vision_body(tower)  # keys without `vision_model.` on every transformers release
    own = body.state_dict()
    positions = own["embeddings.position_embedding.weight"].shape[0]
    if vis["visual.positional_embedding"].shape[0] != positions:
        g = int(round((positions - 1) ** 0.5))
        vis["visual.positional_embedding"] = resample_pos_embed(vis["visual.positional_embedding"], (g, g))
    hf = {k[len("vision_model."):]: v for k, v in alphaclip_to_hf(vis).items() if k.startswith("vision_model.")}
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in hf.items() if k in own and v.shape != own[k].shape
    ]
    new_alpha = "embeddings.patch_embedding_alpha.weight" not in hf
    missing = [k for k in own if k not in hf and not (new_alpha and k.endswith("patch_embedding_alpha.weight"))]
    unexpected = [k for k in hf if k not in own]
    if wrong or missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this vision tower: "
            + "; ".join(filter(None, [
                f"shapes (file vs tower) {', '.join(wrong[:4])}" if wrong else "",
                f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
            ]))
            + ". Use the Alpha-CLIP weights of the tower's architecture"
        )
    body.load_state_dict(hf, strict=False)
    return LoadResult(detect_format(raw), [], [], new_alpha)
