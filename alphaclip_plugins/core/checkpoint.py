"""Loading any supported checkpoint into an Alpha-CLIP model, and exporting one to any layout."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .config import ARCHITECTURES, CLIPConfig
from .convert import StateDict, detect_format, from_alphaclip, strip_prefix, to_alphaclip
from .io import CheckpointError, PathLike, read_state_dict, save_safetensors, save_torch

#: Keys a plain CLIP checkpoint lacks: loading one leaves the zero-initialised alpha conv in place.
ALPHA_KEYS = ("visual.conv1_alpha.weight",)


@dataclass
class LoadResult:
    """What a load did: the file's layout, and keys it left out or had too many of."""

    format: str
    missing: List[str] = field(default_factory=list)  # model keys the file did not set (beyond alpha)
    unexpected: List[str] = field(default_factory=list)  # file keys the model has no place for
    new_alpha: bool = False  # True when the file had no alpha conv (plain CLIP): it stays zero


def describe(sd: Mapping[str, torch.Tensor]) -> Dict[str, object]:
    """Architecture facts readable from a canonical-layout state dict (widths, depths, sizes)."""
    facts: Dict[str, object] = {}
    if "visual.conv1.weight" in sd:
        conv, pos = sd["visual.conv1.weight"], sd["visual.positional_embedding"]
        grid = int(round((pos.shape[0] - 1) ** 0.5))
        facts.update(
            vision_width=conv.shape[0], patch_size=conv.shape[-1], image_size=grid * conv.shape[-1],
            vision_layers=_count_blocks(sd, "visual.transformer.resblocks."),
            vision_mlp_dim=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            embed_dim=sd["visual.proj"].shape[1] if "visual.proj" in sd else None,
            has_alpha="visual.conv1_alpha.weight" in sd,
        )
    if "token_embedding.weight" in sd:
        facts.update(
            text_width=sd["token_embedding.weight"].shape[1], vocab_size=sd["token_embedding.weight"].shape[0],
            context_length=sd["positional_embedding"].shape[0], text_layers=_count_blocks(sd, "transformer.resblocks."),
        )
    return facts


def _count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _cfg_facts(cfg: CLIPConfig) -> Dict[str, object]:
    v, t = cfg.vision, cfg.text
    facts = dict(
        vision_width=v.width, patch_size=v.patch_size, image_size=v.image_size, vision_layers=v.layers,
        vision_mlp_dim=v.mlp_dim, embed_dim=v.embed_dim,
    )
    if t is not None:  # vision-only configs have no text facts
        facts.update(text_width=t.width, vocab_size=t.vocab_size, context_length=t.context_length,
                     text_layers=t.layers)
    return facts


def match_architecture(facts: Mapping[str, object]) -> Optional[str]:
    """The name in :data:`ARCHITECTURES` whose shapes agree with ``facts``; the image size may differ."""
    for name, cfg in ARCHITECTURES.items():
        ref = _cfg_facts(cfg)
        if all(ref.get(k) == v for k, v in facts.items() if k in ref and v is not None and k != "image_size"):
            same_size = [n for n, c in ARCHITECTURES.items() if _cfg_facts(c) == {**ref, "image_size": facts.get("image_size")}]
            return same_size[0] if same_size else name
    return None


def _summary(facts: Mapping[str, object]) -> str:
    name = match_architecture(facts)
    parts = [f"{k} {facts[k]}" for k in ("vision_width", "vision_layers", "patch_size", "image_size", "text_width")
             if facts.get(k) is not None]
    return (f"{name} " if name else "") + "(" + ", ".join(parts) + ")"


def check_architecture(cfg: CLIPConfig, sd: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> None:
    """Raise a clear error when ``sd`` was made for a different architecture than ``cfg``.

    A different image size is fine: the positional embedding is resampled at load.
    """
    facts = {k: v for k, v in describe(sd).items() if v is not None}
    ref = {k: v for k, v in _cfg_facts(cfg).items() if k in facts}  # compare what the file tells
    wrong = [k for k in ref if k != "image_size" and ref[k] != facts[k]]
    if wrong:
        raise CheckpointError(
            f"{source} holds {_summary(facts)} but the model is {_summary(ref)}: {', '.join(wrong)} differ. "
            f"Create the model with the architecture the file holds"
            + (f", e.g. create_model({match_architecture(facts)!r}, ...)" if match_architecture(facts) else "")
        )


def _resize_positions(model_sd: Mapping[str, torch.Tensor], sd: StateDict) -> StateDict:
    from .vision import resample_pos_embed

    key = "visual.positional_embedding"
    if key in sd and key in model_sd and sd[key].shape != model_sd[key].shape:
        g = int(round((model_sd[key].shape[0] - 1) ** 0.5))
        sd = {**sd, key: resample_pos_embed(sd[key], (g, g))}
    return sd


def load_state_dict(
    model: nn.Module, sd: Mapping[str, torch.Tensor], strict: bool = True, source: str = "the checkpoint",
    prefix: str = "",
) -> LoadResult:
    """Load a state dict of any supported layout into ``model`` (an ``AlphaCLIP``, or its tower with ``prefix='visual.'``).

    Args:
        strict: refuse files that leave model weights unset (other than the alpha conv of a plain
            CLIP file) or carry weights the model has no place for.
        prefix: the canonical-layout prefix of ``model`` (``"visual."`` for a bare vision tower).

    Raises:
        CheckpointError: wrong architecture, or (strict) missing / unexpected keys, named.
    """
    fmt, canon, own = _fit(model, sd, source, prefix)
    missing = [k for k in own if k not in canon]
    unexpected = [k for k in canon if k not in own]
    new_alpha = any(k in missing for k in ALPHA_KEYS) and any(k.startswith("visual.") for k in canon)
    missing = [k for k in missing if not (new_alpha and k in ALPHA_KEYS)]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source} ({fmt} layout) does not fit the model: "
            + (f"missing {_short(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {_short(unexpected)}" if unexpected else "")
            + ". Pass strict=False to load what fits"
        )
    model.load_state_dict({k[len(prefix):]: v for k, v in canon.items() if k in own}, strict=False)
    return LoadResult(fmt, missing, unexpected, new_alpha)


def tower_state_dict(
    sd: Mapping[str, torch.Tensor], tower: nn.Module, source: str = "the checkpoint"
) -> StateDict:
    """A state dict of any supported layout -> keys of the vision ``tower`` (a core ``VisionTransformer``).

    The architecture is checked and the positional embedding resampled to the tower's size. Framework
    adapters use this to accept every layout through their own loading paths.
    """
    _, vis, _ = _fit(tower, sd, source, "visual.")
    if not vis:
        raise CheckpointError(f"{source} holds no vision tower (its keys are {_short(sorted(sd))})")
    return {k[len("visual."):]: v for k, v in vis.items()}


def _fit(
    model: nn.Module, sd: Mapping[str, torch.Tensor], source: str, prefix: str
) -> Tuple[str, StateDict, StateDict]:
    """Any layout -> ``(format, canonical keys under prefix, the model's own keys with prefix)``.

    The architecture is checked against the model's config (a full ``CLIPConfig``, or a tower's
    ``VisionConfig``) and the positional embedding resampled to the model's size.
    """
    sd = strip_prefix(sd, "module.")
    fmt = detect_format(sd)
    canon = to_alphaclip(sd, fmt)
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, CLIPConfig):
        check_architecture(cfg, canon, source)
    elif prefix == "visual." and cfg is not None:
        check_architecture(CLIPConfig(vision=cfg), {k: v for k, v in canon.items() if k.startswith(prefix)}, source)
    own = {prefix + k: v for k, v in model.state_dict().items()}
    return fmt, {k: v for k, v in _resize_positions(own, canon).items() if k.startswith(prefix)}, own


def _short(keys: List[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_checkpoint(model: nn.Module, path: PathLike, strict: bool = True, prefix: str = "") -> LoadResult:
    """Read ``path`` (any supported layout, file or directory) and load it into ``model``."""
    return load_state_dict(model, read_state_dict(path), strict=strict, source=str(path), prefix=prefix)


def export_state_dict(model: nn.Module, fmt: str) -> StateDict:
    """The model's weights in layout ``fmt`` (``alphaclip``, ``official``, ``hf``, ``timm``, ``open_clip``)."""
    sd = model.state_dict()
    if not any(k.startswith("visual.") for k in sd):  # a bare vision tower
        sd = {"visual." + k: v for k, v in sd.items()}
    return from_alphaclip(sd, fmt)


def save_official(model: nn.Module, path: PathLike) -> None:
    """Write the vision tower as the original Alpha-CLIP code reads it (a ``.pth`` of tensors)."""
    save_torch(export_state_dict(model, "official"), path)


def save_weights(model: nn.Module, path: PathLike, fmt: str = "alphaclip") -> None:
    """Write weights in layout ``fmt`` to ``path``: safetensors unless the name ends in ``.pt``/``.pth``/``.bin``."""
    sd = export_state_dict(model, fmt)
    if str(path).endswith((".pt", ".pth", ".bin")):
        save_torch(sd, path)
    else:
        save_safetensors(sd, path)
