"""Pure ``state_dict -> state_dict`` converters between checkpoint layouts, picked by signature keys.

The canonical layout is OpenAI CLIP's (``visual.*`` + text keys + ``logit_scale``) plus
``visual.conv1_alpha.weight``. Each foreign layout is one key table, read in one direction to import
and in the other to export, so every layout converts to the canonical one and back bit-exactly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import torch

StateDict = Dict[str, torch.Tensor]
Format = Literal["alphaclip", "official", "hf", "timm", "open_clip"]
#: Layouts weights can be exported to (``open_clip``: what an alphafied open_clip model loads).
FORMATS = ("alphaclip", "official", "hf", "timm", "open_clip")

# Entries of OpenAI's TorchScript archives, and buffers of older HF files, that are not weights.
_NOT_WEIGHTS = re.compile(r"^(input_resolution|context_length|vocab_size)$|position_ids$")
# Wrappers training code puts around every key: DDP's ``module.``, torch.compile's ``_orig_mod.``.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_OPEN_CLIP_ALPHA = re.compile(r"^visual\.conv1\.alpha\.")


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Remove ``prefix`` (e.g. ``module.`` of DDP checkpoints) where every key carries it."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def strip_wrappers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove the prefixes of training wrappers (``module.``, ``_orig_mod.``), however nested."""
    out = dict(sd)
    while True:
        for prefix in _WRAPPER_PREFIXES:
            stripped = strip_prefix(out, prefix)
            if stripped.keys() != out.keys():
                out = stripped
                break
        else:
            return out


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
    if "visual.conv1.weight" in keys or "token_embedding.weight" in keys or "text.token_embedding.weight" in keys:
        return "alphaclip"  # also OpenAI CLIP and open_clip files: the same layout without conv1_alpha
    if "conv1.weight" in keys:
        return "official"
    sample = ", ".join(sorted(keys)[:6])
    raise ValueError(
        "unrecognised checkpoint layout: none of the signature keys 'visual.conv1.weight' (OpenAI/open_clip), "
        "'conv1.weight' (official Alpha-CLIP), 'vision_model.embeddings.patch_embedding.weight' (Hugging Face) "
        f"or 'patch_embed.proj.weight' (timm) is present; its first keys are: {sample}"
    )


# --- key tables ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One canonical key pattern and its foreign counterpart. ``{i}`` is a block index, ``{p}`` weight/bias.

    ``theirs`` with three patterns is a canonical tensor stacked from three (q, k, v); ``op`` reshapes:
    ``"T"`` transposes (projection matrices), ``"cls"`` / ``"pos"`` add timm's leading batch dimensions.
    """

    ours: str
    theirs: Tuple[str, ...]
    op: str = ""


def _rules(*rows: Tuple[str, object, str]) -> Tuple[Rule, ...]:
    return tuple(Rule(o, (t,) if isinstance(t, str) else tuple(t), op) for o, t, op in rows)


def _tower_rules(ours: str, theirs: str) -> List[Tuple[str, object, str]]:
    """The per-block rows shared by HF's vision and text towers."""
    b, h = f"{ours}transformer.resblocks.{{i}}", f"{theirs}.encoder.layers.{{i}}"
    return [
        (f"{b}.ln_1.{{p}}", f"{h}.layer_norm1.{{p}}", ""), (f"{b}.ln_2.{{p}}", f"{h}.layer_norm2.{{p}}", ""),
        (f"{b}.mlp.c_fc.{{p}}", f"{h}.mlp.fc1.{{p}}", ""), (f"{b}.mlp.c_proj.{{p}}", f"{h}.mlp.fc2.{{p}}", ""),
        (f"{b}.attn.out_proj.{{p}}", f"{h}.self_attn.out_proj.{{p}}", ""),
        (f"{b}.attn.in_proj_{{p}}", [f"{h}.self_attn.{x}_proj.{{p}}" for x in "qkv"], ""),
    ]


_V, _T = "vision_model", "text_model"
_TABLES: Dict[str, Tuple[Rule, ...]] = {
    # Hugging Face CLIPModel / CLIPVisionModel(WithProjection); alpha as `patch_embedding_alpha`.
    "hf": _rules(
        ("visual.conv1.weight", f"{_V}.embeddings.patch_embedding.weight", ""),
        ("visual.conv1_alpha.weight", f"{_V}.embeddings.patch_embedding_alpha.weight", ""),
        ("visual.class_embedding", f"{_V}.embeddings.class_embedding", ""),
        ("visual.positional_embedding", f"{_V}.embeddings.position_embedding.weight", ""),
        ("visual.ln_pre.{p}", f"{_V}.pre_layrnorm.{{p}}", ""), ("visual.ln_post.{p}", f"{_V}.post_layernorm.{{p}}", ""),
        ("visual.proj", "visual_projection.weight", "T"),
        *_tower_rules("visual.", _V),
        ("token_embedding.weight", f"{_T}.embeddings.token_embedding.weight", ""),
        ("positional_embedding", f"{_T}.embeddings.position_embedding.weight", ""),
        ("ln_final.{p}", f"{_T}.final_layer_norm.{{p}}", ""), ("text_projection", "text_projection.weight", "T"),
        *_tower_rules("", _T),
        ("logit_scale", "logit_scale", ""),
    ),
    # timm vit_*_clip_*: the vision tower only; `head` is CLIP's projection (weight = proj.T, zero bias).
    "timm": _rules(
        ("visual.conv1.weight", "patch_embed.proj.weight", ""),
        ("visual.conv1_alpha.weight", "patch_embed.proj_alpha.weight", ""),
        ("visual.class_embedding", "cls_token", "cls"), ("visual.positional_embedding", "pos_embed", "pos"),
        ("visual.ln_pre.{p}", "norm_pre.{p}", ""), ("visual.ln_post.{p}", "norm.{p}", ""),
        ("visual.proj", "head.weight", "T"),
        ("visual.transformer.resblocks.{i}.ln_1.{p}", "blocks.{i}.norm1.{p}", ""),
        ("visual.transformer.resblocks.{i}.ln_2.{p}", "blocks.{i}.norm2.{p}", ""),
        ("visual.transformer.resblocks.{i}.attn.in_proj_{p}", "blocks.{i}.attn.qkv.{p}", ""),
        ("visual.transformer.resblocks.{i}.attn.out_proj.{p}", "blocks.{i}.attn.proj.{p}", ""),
        ("visual.transformer.resblocks.{i}.mlp.c_fc.{p}", "blocks.{i}.mlp.fc1.{p}", ""),
        ("visual.transformer.resblocks.{i}.mlp.c_proj.{p}", "blocks.{i}.mlp.fc2.{p}", ""),
    ),
    # The official Alpha-CLIP release: the vision tower without `visual.`, attention as an nn.Linear.
    "official": _rules(
        ("visual.transformer.resblocks.{i}.attn.in_proj_{p}", "transformer.resblocks.{i}.attn.in_proj.{p}", ""),
        ("visual.{rest}", "{rest}", ""),
    ),
}
_FIELDS = {"i": r"\d+", "p": r"weight|bias", "rest": r".+"}


@lru_cache(maxsize=None)
def _pattern(template: str) -> "re.Pattern[str]":
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(s) if n % 2 == 0 else f"(?P<{s}>{_FIELDS[s]})" for n, s in enumerate(parts)) + "$")


def _reshape(v: torch.Tensor, op: str, to_theirs: bool) -> torch.Tensor:
    if op == "T":
        return v.t().contiguous()
    if op == "cls":
        return v.reshape(1, 1, -1) if to_theirs else v.reshape(-1)
    if op == "pos":
        return v.unsqueeze(0) if to_theirs else v.reshape(v.shape[-2], v.shape[-1])
    return v


def _translate(sd: Mapping[str, torch.Tensor], rules: Sequence[Rule], to_theirs: bool) -> StateDict:
    """Rename (and split, stack, reshape) keys by ``rules``; keys no rule knows are kept as they are."""
    out: StateDict = {}
    for key, value in sd.items():
        for rule in rules:
            src, dst = (rule.ours, rule.theirs) if to_theirs else (rule.theirs[0], (rule.ours,))
            m = _pattern(src).match(key)
            if m is None:
                continue
            if to_theirs and len(dst) == 3:  # one stacked tensor -> q, k, v
                for name, part in zip(dst, value.chunk(3)):
                    out[name.format(**m.groupdict())] = part.contiguous()
            elif not to_theirs and len(rule.theirs) == 3:  # q -> stack q, k, v
                names = [t.format(**m.groupdict()) for t in rule.theirs]
                out[dst[0].format(**m.groupdict())] = torch.cat([sd[n] for n in names])
            else:
                out[dst[0].format(**m.groupdict())] = _reshape(value, rule.op, to_theirs)
            break
        else:
            if not (not to_theirs and _is_stacked_part(key, rules)):
                out[key] = value
    return out


def _is_stacked_part(key: str, rules: Sequence[Rule]) -> bool:
    """k and v of a q, k, v triple: consumed when its q was stacked."""
    return any(len(r.theirs) == 3 and any(_pattern(t).match(key) for t in r.theirs[1:]) for r in rules)


# --- layout-specific steps around the tables ----------------------------------------------------------
def _from_hf(sd: Mapping[str, torch.Tensor]) -> StateDict:
    if "embeddings.patch_embedding.weight" in sd:  # transformers v5 CLIPVisionModel: no prefix
        sd = {f"{_V}.{k}": v for k, v in sd.items()}
    return _translate(sd, _TABLES["hf"], to_theirs=False)


def _from_timm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    sd = dict(sd)
    bias = sd.pop("head.bias", None)
    if bias is not None and bias.abs().max() > 0:
        raise ValueError(
            "the timm checkpoint's head has a non-zero bias, so it is a fine-tuned classifier rather than "
            "CLIP's image projection; load it with timm, or drop 'head.*' to keep only the tower"
        )
    return _translate(sd, _TABLES["timm"], to_theirs=False)


def _to_timm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    out = _translate({k: v for k, v in sd.items() if k.startswith("visual.")}, _TABLES["timm"], to_theirs=True)
    if "head.weight" in out:  # towers without a projection (LLaVA's, HF's CLIPVisionModel) have no head
        out["head.bias"] = torch.zeros(out["head.weight"].shape[0], dtype=out["head.weight"].dtype)
    return out


def _from_openai(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """OpenAI CLIP, open_clip (also its ``CustomTextCLIP``'s ``text.`` tower and an alphafied model's
    ``visual.conv1.alpha``) and this package's layout."""
    out: StateDict = {}
    for k, v in sd.items():
        k = k[len("text."):] if k.startswith("text.") else k
        k = _OPEN_CLIP_ALPHA.sub("visual.conv1_alpha.", k)
        out[re.sub(r"\.attn\.in_proj\.(weight|bias)$", r".attn.in_proj_\1", k)] = v
    return out


def to_alphaclip(sd: Mapping[str, torch.Tensor], fmt: Optional[str] = None) -> StateDict:
    """Any supported layout -> the canonical layout (``fmt`` is detected when None).

    Keys that are not weights (TorchScript metadata, ``position_ids``) are dropped; keys no table knows
    are kept under their own names, so a strict load can name them.
    """
    sd = {k: v for k, v in strip_wrappers(sd).items() if not _NOT_WEIGHTS.search(k)}
    fmt = fmt or detect_format(sd)
    if fmt == "hf":
        return _from_hf(sd)
    if fmt == "timm":
        return _from_timm(sd)
    if fmt == "official":
        return _translate(sd, _TABLES["official"], to_theirs=False)
    return _from_openai(sd)


def from_alphaclip(sd: Mapping[str, torch.Tensor], fmt: str) -> StateDict:
    """The canonical layout -> ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "alphaclip":
        return dict(sd)
    if fmt == "open_clip":  # an alphafied open_clip model holds the alpha conv inside its conv1
        return {k.replace("visual.conv1_alpha.", "visual.conv1.alpha."): v for k, v in sd.items()}
    if fmt == "timm":
        return _to_timm(sd)
    if fmt == "official":
        sd = {k: v for k, v in sd.items() if k.startswith("visual.")}
    return _translate(sd, _TABLES[fmt], to_theirs=True)
