"""Pure ``state_dict -> state_dict`` converters between checkpoint layouts, picked by signature keys.

The canonical layout is OpenAI CLIP's (``visual.*`` + text keys + ``logit_scale``) plus
``visual.conv1_alpha.weight``. Every other layout converts to it and back, bit-exactly.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Literal, Mapping

import torch

StateDict = Dict[str, torch.Tensor]
Format = Literal["alphaclip", "official", "hf", "timm", "open_clip"]
FORMATS = ("alphaclip", "official", "hf", "timm", "open_clip")

# Metadata entries of OpenAI's TorchScript archives that are not parameters.
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Remove ``prefix`` (e.g. ``module.`` of DDP checkpoints) where every key carries it."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def detect_format(sd: Mapping[str, torch.Tensor]) -> Format:
    """Name the layout of a state dict from its signature keys.

    Raises:
        ValueError: if no known signature key is present.
    """
    keys = set(sd)
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys) or "embeddings.patch_embedding.weight" in keys:
        return "hf"
    if "patch_embed.proj.weight" in keys:
        return "timm"
    if "visual.conv1.weight" in keys:
        return "alphaclip"  # also OpenAI CLIP and open_clip files: the same layout without conv1_alpha
    if "conv1.weight" in keys:
        return "official"
    sample = ", ".join(sorted(keys)[:6])
    raise ValueError(
        "unrecognised checkpoint layout: none of the signature keys 'visual.conv1.weight' (OpenAI/open_clip), "
        "'conv1.weight' (official Alpha-CLIP), 'vision_model.embeddings.patch_embedding.weight' (Hugging Face) "
        f"or 'patch_embed.proj.weight' (timm) is present; its first keys are: {sample}"
    )


def _rename(sd: Mapping[str, torch.Tensor], rules) -> StateDict:
    out: StateDict = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


# --- official Alpha-CLIP release: vision tower only, `attn.in_proj.{weight,bias}` ----------------------

def official_to_alphaclip(sd: Mapping[str, torch.Tensor]) -> StateDict:
    sd = _rename(sd, [(r"\.attn\.in_proj\.(weight|bias)$", r".attn.in_proj_\1")])
    return {"visual." + k: v for k, v in sd.items()}


def alphaclip_to_official(sd: Mapping[str, torch.Tensor]) -> StateDict:
    vis = {k[7:]: v for k, v in sd.items() if k.startswith("visual.")}
    return _rename(vis, [(r"\.attn\.in_proj_(weight|bias)$", r".attn.in_proj.\1")])


def openai_to_alphaclip(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """OpenAI CLIP / open_clip / our own layout (drops TorchScript metadata, accepts `in_proj.weight`)."""
    sd = {k: v for k, v in sd.items() if k not in _OPENAI_EXTRAS}
    return _rename(sd, [(r"\.attn\.in_proj\.(weight|bias)$", r".attn.in_proj_\1")])


# --- Hugging Face CLIPModel / CLIPVisionModel(WithProjection) ----------------------------------------

_HF_BLOCK = [  # (ours, theirs) inside one block
    ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
]


def _hf_tower(sd: Mapping[str, torch.Tensor], hf: str, ours: str, out: StateDict) -> None:
    """Blocks of one tower: HF's separate q/k/v become one stacked in_proj."""
    n = 0
    while f"{hf}.encoder.layers.{n}.layer_norm1.weight" in sd:
        h, o = f"{hf}.encoder.layers.{n}", f"{ours}transformer.resblocks.{n}"
        for a, b in _HF_BLOCK:
            for p in ("weight", "bias"):
                out[f"{o}.{a}.{p}"] = sd[f"{h}.{b}.{p}"]
        for p in ("weight", "bias"):
            out[f"{o}.attn.in_proj_{p}"] = torch.cat([sd[f"{h}.self_attn.{x}_proj.{p}"] for x in "qkv"])
        n += 1


def hf_to_alphaclip(sd: Mapping[str, torch.Tensor]) -> StateDict:
    if "embeddings.patch_embedding.weight" in sd:  # transformers v5 CLIPVisionModel: no prefix
        sd = {"vision_model." + k: v for k, v in sd.items()}
    out: StateDict = {}
    v = "vision_model"
    if f"{v}.embeddings.patch_embedding.weight" in sd:
        out["visual.conv1.weight"] = sd[f"{v}.embeddings.patch_embedding.weight"]
        if f"{v}.embeddings.patch_embedding_alpha.weight" in sd:
            out["visual.conv1_alpha.weight"] = sd[f"{v}.embeddings.patch_embedding_alpha.weight"]
        out["visual.class_embedding"] = sd[f"{v}.embeddings.class_embedding"]
        out["visual.positional_embedding"] = sd[f"{v}.embeddings.position_embedding.weight"]
        for p in ("weight", "bias"):
            out[f"visual.ln_pre.{p}"] = sd[f"{v}.pre_layrnorm.{p}"]
            out[f"visual.ln_post.{p}"] = sd[f"{v}.post_layernorm.{p}"]
        _hf_tower(sd, v, "visual.", out)
        if "visual_projection.weight" in sd:
            out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    t = "text_model"
    if f"{t}.embeddings.token_embedding.weight" in sd:
        out["token_embedding.weight"] = sd[f"{t}.embeddings.token_embedding.weight"]
        out["positional_embedding"] = sd[f"{t}.embeddings.position_embedding.weight"]
        for p in ("weight", "bias"):
            out[f"ln_final.{p}"] = sd[f"{t}.final_layer_norm.{p}"]
        _hf_tower(sd, t, "", out)
        out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    if "logit_scale" in sd:
        out["logit_scale"] = sd["logit_scale"]
    return out


def _hf_tower_out(sd: Mapping[str, torch.Tensor], ours: str, hf: str, out: StateDict) -> None:
    n = 0
    while f"{ours}transformer.resblocks.{n}.ln_1.weight" in sd:
        o, h = f"{ours}transformer.resblocks.{n}", f"{hf}.encoder.layers.{n}"
        for a, b in _HF_BLOCK:
            for p in ("weight", "bias"):
                out[f"{h}.{b}.{p}"] = sd[f"{o}.{a}.{p}"]
        for p in ("weight", "bias"):
            for x, part in zip("qkv", sd[f"{o}.attn.in_proj_{p}"].chunk(3)):
                out[f"{h}.self_attn.{x}_proj.{p}"] = part.contiguous()
        n += 1


def alphaclip_to_hf(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """To a ``CLIPModel`` state dict (vision only where ``sd`` has no text tower); alpha as ``patch_embedding_alpha``."""
    out: StateDict = {}
    v = "vision_model"
    out[f"{v}.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    if "visual.conv1_alpha.weight" in sd:
        out[f"{v}.embeddings.patch_embedding_alpha.weight"] = sd["visual.conv1_alpha.weight"]
    out[f"{v}.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out[f"{v}.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    for p in ("weight", "bias"):
        out[f"{v}.pre_layrnorm.{p}"] = sd[f"visual.ln_pre.{p}"]
        out[f"{v}.post_layernorm.{p}"] = sd[f"visual.ln_post.{p}"]
    _hf_tower_out(sd, "visual.", v, out)
    if "visual.proj" in sd:  # towers without a projection (LLaVA's, timm's headless) have none
        out["visual_projection.weight"] = sd["visual.proj"].t().contiguous()
    if "token_embedding.weight" in sd:
        t = "text_model"
        out[f"{t}.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
        out[f"{t}.embeddings.position_embedding.weight"] = sd["positional_embedding"]
        for p in ("weight", "bias"):
            out[f"{t}.final_layer_norm.{p}"] = sd[f"ln_final.{p}"]
        _hf_tower_out(sd, "", t, out)
        out["text_projection.weight"] = sd["text_projection"].t().contiguous()
    if "logit_scale" in sd:
        out["logit_scale"] = sd["logit_scale"]
    return out


# --- timm vit_*_clip_*: vision tower only, `head.weight` = proj.T ------------------------------------

_TIMM_RULES = [  # (timm, ours) applied as regex substitutions
    (r"^patch_embed\.proj\.weight$", "conv1.weight"),
    (r"^patch_embed\.proj_alpha\.weight$", "conv1_alpha.weight"),
    (r"^norm_pre\.", "ln_pre."), (r"^norm\.", "ln_post."),
    (r"^blocks\.(\d+)\.norm1\.", r"transformer.resblocks.\1.ln_1."),
    (r"^blocks\.(\d+)\.norm2\.", r"transformer.resblocks.\1.ln_2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"transformer.resblocks.\1.attn.in_proj_\2"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer.resblocks.\1.attn.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
]


def timm_to_alphaclip(sd: Mapping[str, torch.Tensor]) -> StateDict:
    sd = dict(sd)
    out: StateDict = {"visual.class_embedding": sd.pop("cls_token").reshape(-1)}
    pos = sd.pop("pos_embed")
    out["visual.positional_embedding"] = pos.reshape(pos.shape[-2], pos.shape[-1])
    head_w, head_b = sd.pop("head.weight", None), sd.pop("head.bias", None)
    if head_b is not None and head_b.abs().max() > 0:
        raise ValueError(
            "the timm checkpoint's head has a non-zero bias, so it is a fine-tuned classifier rather than "
            "CLIP's image projection; load it with timm, or drop 'head.*' to keep only the tower"
        )
    if head_w is not None:
        out["visual.proj"] = head_w.t().contiguous()
    for k, v in _rename(sd, _TIMM_RULES).items():
        out["visual." + k] = v
    return out


def alphaclip_to_timm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    vis = {k[7:]: v for k, v in sd.items() if k.startswith("visual.")}
    out: StateDict = {
        "cls_token": vis.pop("class_embedding").reshape(1, 1, -1),
        "pos_embed": vis.pop("positional_embedding").unsqueeze(0),
    }
    proj = vis.pop("proj", None)
    if proj is not None:  # a tower without a projection (LLaVA's, HF's CLIPVisionModel) has no head
        out["head.weight"] = proj.t().contiguous()
        out["head.bias"] = torch.zeros(proj.shape[1], dtype=proj.dtype)
    for k, v in vis.items():
        out[_to_timm_key(k)] = v
    return out


def _to_timm_key(k: str) -> str:
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)$", k)
    if m:
        i, rest = m.groups()
        rest = {"attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias"}.get(rest, rest)
        rest = (rest.replace("ln_1.", "norm1.").replace("ln_2.", "norm2.").replace("attn.out_proj.", "attn.proj.")
                .replace("mlp.c_fc.", "mlp.fc1.").replace("mlp.c_proj.", "mlp.fc2."))
        return f"blocks.{i}.{rest}"
    return {
        "conv1.weight": "patch_embed.proj.weight", "conv1_alpha.weight": "patch_embed.proj_alpha.weight",
        "ln_pre.weight": "norm_pre.weight", "ln_pre.bias": "norm_pre.bias",
        "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias",
    }[k]


_TO_ALPHACLIP: Dict[str, Callable[[Mapping[str, torch.Tensor]], StateDict]] = {
    "alphaclip": openai_to_alphaclip, "open_clip": openai_to_alphaclip, "official": official_to_alphaclip,
    "hf": hf_to_alphaclip, "timm": timm_to_alphaclip,
}
_FROM_ALPHACLIP: Dict[str, Callable[[Mapping[str, torch.Tensor]], StateDict]] = {
    "alphaclip": dict, "open_clip": dict, "official": alphaclip_to_official,
    "hf": alphaclip_to_hf, "timm": alphaclip_to_timm,
}


def to_alphaclip(sd: Mapping[str, torch.Tensor], fmt: str | None = None) -> StateDict:
    """Any supported layout -> the canonical layout (``fmt`` is detected when None)."""
    sd = strip_prefix(sd, "module.")
    return _TO_ALPHACLIP[fmt or detect_format(sd)](sd)


def from_alphaclip(sd: Mapping[str, torch.Tensor], fmt: str) -> StateDict:
    """The canonical layout -> ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in _FROM_ALPHACLIP:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return _FROM_ALPHACLIP[fmt](sd)
