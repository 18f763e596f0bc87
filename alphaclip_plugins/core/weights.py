"""One way in: any checkpoint, in any layout, becomes canonical weights for a target architecture.

Every entry point (``create_model``, the CLI, the trainer and each framework adapter) loads through
:func:`resolve`, which reads the source, strips wrappers, detects the layout, converts, gives a plain
CLIP a zero alpha conv, checks the architecture, resamples positions and reports missing and
unexpected keys, once. Adapters translate the canonical keys into their own with ``from_alphaclip``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from .config import ARCHITECTURES, CLIPConfig, TextConfig, VisionConfig
from .convert import StateDict, detect_format, strip_wrappers, to_alphaclip
from .io import CheckpointError, PathLike, read_state_dict

Source = Union[PathLike, Mapping[str, torch.Tensor]]
Target = Union[CLIPConfig, VisionConfig]  # a VisionConfig means a bare tower: keys without ``visual.``
ALPHA_KEY = "visual.conv1_alpha.weight"


@dataclass(frozen=True)
class Weights:
    """Canonical-layout weights as read from a source, before they are fitted to an architecture."""

    state_dict: StateDict  # canonical keys (``visual.*``, text keys, ``logit_scale``), conv1_alpha always present
    source: str  # where they came from, for messages
    format: str  # the layout the source had
    new_alpha: bool  # the source had no alpha conv (plain CLIP): a zero one was added

    def facts(self) -> Dict[str, object]:
        return describe(self.state_dict)


@dataclass(frozen=True)
class LoadReport:
    """What a load did."""

    source: str
    format: str  # the layout the file had: alphaclip (also OpenAI / open_clip), official, hf, timm
    missing: Tuple[str, ...] = ()  # target keys the source did not set
    unexpected: Tuple[str, ...] = ()  # source keys the target has no place for
    new_alpha: bool = False  # True when the source had no alpha conv (plain CLIP): it is zero
    resampled: bool = False  # the positional embedding was resized to the target's grid

    def check(self, allow_missing: Tuple[str, ...] = ()) -> None:
        """Raise unless every target key was set (but ``allow_missing``) and no source key was left over.

        Raises:
            CheckpointError: naming the missing and unexpected keys.
        """
        missing = [k for k in self.missing if k not in allow_missing]
        if missing or self.unexpected:
            raise CheckpointError(
                f"{self.source} ({self.format} layout) does not fit the model: "
                + "; ".join(filter(None, [f"missing {_short(missing)}" if missing else "",
                                          f"unexpected {_short(self.unexpected)}" if self.unexpected else ""]))
                + ". Pass strict=False to load what fits"
            )


def read_weights(source: Source, name: Optional[str] = None) -> Weights:
    """Read ``source`` (a file, a directory or a state dict) into canonical keys.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: unreadable file, or a layout no converter knows.
    """
    name = name or ("the state dict" if isinstance(source, Mapping) else str(source))
    raw = strip_wrappers(source if isinstance(source, Mapping) else read_state_dict(source))
    try:
        fmt = detect_format(raw)
        sd = to_alphaclip(raw, fmt)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{name}: {e}") from None
    conv = sd.get("visual.conv1.weight")
    new_alpha = conv is not None and ALPHA_KEY not in sd
    if new_alpha:  # plain CLIP: a zero alpha conv keeps it exactly CLIP
        sd[ALPHA_KEY] = conv.new_zeros(conv.shape[0], 1, *conv.shape[2:])
    return Weights(sd, name, fmt, new_alpha)


def resolve(source: Union[Source, Weights], target: Target, strict: bool = True) -> Tuple[StateDict, LoadReport]:
    """``source`` fitted to ``target``: ``(state dict in the target's canonical keys, report)``.

    A ``VisionConfig`` target takes the vision tower of any file (a text tower is ignored) and returns
    keys relative to the tower; a ``CLIPConfig`` target returns full canonical keys.

    Args:
        strict: refuse sources that leave target weights unset or carry weights it has no place for.

    Raises:
        CheckpointError: unreadable source, another architecture, or (strict) missing / unexpected keys.
    """
    w = source if isinstance(source, Weights) else read_weights(source)
    tower = isinstance(target, VisionConfig)
    sd = {k: v for k, v in w.state_dict.items() if k.startswith("visual.")} if tower else dict(w.state_dict)
    if tower and not sd:
        raise CheckpointError(f"{w.source} holds no vision tower (its keys are {_short(sorted(w.state_dict))})")
    full = CLIPConfig(vision=target, text=None) if tower else target
    check_architecture(full, sd, w.source)
    own = _target_shapes(full)
    resampled = _resample_positions(sd, own)
    missing = tuple(k for k in own if k not in sd)
    unexpected = tuple(k for k in sd if k not in own)
    wrong = [f"{k} {tuple(sd[k].shape)} (model {own[k]})" for k in own if k in sd and tuple(sd[k].shape) != own[k]]
    if wrong:
        raise CheckpointError(f"{w.source} ({w.format} layout) has tensors of other shapes: {_short(wrong, 4)}")
    strip = len("visual.") if tower else 0  # report keys as the target names them
    report = LoadReport(w.source, w.format, tuple(k[strip:] for k in missing), tuple(k[strip:] for k in unexpected),
                        w.new_alpha, resampled)
    if strict:
        report.check()
    return {k[strip:]: v for k, v in sd.items() if k in own}, report


@lru_cache(maxsize=32)
def _target_shapes(cfg: CLIPConfig) -> Dict[str, Tuple[int, ...]]:
    """Canonical key -> shape of a model of ``cfg`` (built on the meta device: no memory, no init)."""
    from .model import AlphaCLIP
    from .vision import VisionTransformer

    with torch.device("meta"):
        if cfg.text is None:
            return {f"visual.{k}": tuple(v.shape) for k, v in VisionTransformer(cfg.vision).state_dict().items()}
        return {k: tuple(v.shape) for k, v in AlphaCLIP(cfg).state_dict().items()}


def _resample_positions(sd: StateDict, own: Mapping[str, Tuple[int, ...]]) -> bool:
    from .vision import resample_pos_embed

    key = "visual.positional_embedding"
    if key not in sd or key not in own or tuple(sd[key].shape) == own[key]:
        return False
    g = int(round((own[key][0] - 1) ** 0.5))
    sd[key] = resample_pos_embed(sd[key], (g, g))
    return True


# --- architecture facts ------------------------------------------------------------------------------
def describe(sd: Mapping[str, torch.Tensor]) -> Dict[str, object]:
    """Architecture facts readable from a canonical-layout state dict (widths, depths, sizes)."""
    facts: Dict[str, object] = {}
    if "visual.conv1.weight" in sd and "visual.positional_embedding" in sd:
        conv, pos = sd["visual.conv1.weight"], sd["visual.positional_embedding"]
        grid = int(round((pos.shape[0] - 1) ** 0.5))
        mlp = sd.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
        facts.update(
            vision_width=conv.shape[0], patch_size=conv.shape[-1], image_size=grid * conv.shape[-1],
            vision_layers=_count_blocks(sd, "visual.transformer.resblocks."),
            vision_mlp_dim=mlp.shape[0] if mlp is not None else None,
            embed_dim=sd["visual.proj"].shape[1] if "visual.proj" in sd else None,
        )
    if "token_embedding.weight" in sd and "positional_embedding" in sd:
        facts.update(
            text_width=sd["token_embedding.weight"].shape[1], vocab_size=sd["token_embedding.weight"].shape[0],
            context_length=sd["positional_embedding"].shape[0], text_layers=_count_blocks(sd, "transformer.resblocks."),
        )
    return facts


def _count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def config_facts(cfg: CLIPConfig) -> Dict[str, object]:
    v, t = cfg.vision, cfg.text
    facts: Dict[str, object] = dict(
        vision_width=v.width, patch_size=v.patch_size, image_size=v.image_size, vision_layers=v.layers,
        vision_mlp_dim=v.mlp_dim, embed_dim=v.embed_dim,
    )
    if t is not None:  # vision-only configs have no text facts
        facts.update(text_width=t.width, vocab_size=t.vocab_size, context_length=t.context_length,
                     text_layers=t.layers)
    return facts


def match_architecture(facts: Mapping[str, object]) -> Optional[str]:
    """The name in :data:`ARCHITECTURES` whose shapes agree with ``facts``, preferring the same image size."""
    fits = [n for n, c in ARCHITECTURES.items()
            if all(config_facts(c).get(k) == v for k, v in facts.items()
                   if k in config_facts(c) and v is not None and k != "image_size")]
    same_size = [n for n in fits if ARCHITECTURES[n].vision.image_size == facts.get("image_size")]
    return (same_size or fits or [None])[0]


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
    ref = {k: v for k, v in config_facts(cfg).items() if k in facts}  # compare what the file tells
    wrong = [k for k in ref if k != "image_size" and ref[k] != facts[k]]
    if wrong:
        hint = match_architecture(facts)
        raise CheckpointError(
            f"{source} holds {_summary(facts)} but the model is {_summary(ref)}: {', '.join(wrong)} differ. "
            f"Create the model with the architecture the file holds"
            + (f", e.g. create_model({hint!r}, ...)" if hint else "")
        )


def infer_config(weights: Weights, act: Optional[str] = None) -> CLIPConfig:
    """The config of the model ``weights`` were made for: read from their shapes, completed from the table.

    Heads and activation cannot be read from weights: they come from the matching architecture, else
    64-wide heads (OpenAI/open_clip ViTs) and ``act`` (default QuickGELU, as OpenAI/Alpha-CLIP weights).

    Raises:
        CheckpointError: the weights hold no vision tower.
    """
    facts = weights.facts()
    if "vision_width" not in facts:
        raise CheckpointError(f"{weights.source} has no vision tower (no 'visual.conv1.weight' after conversion)")
    name = match_architecture(facts)
    base = ARCHITECTURES[name] if name else CLIPConfig()
    act = act or base.vision.act
    width = int(facts["vision_width"])
    vision = VisionConfig(
        image_size=int(facts["image_size"]), patch_size=int(facts["patch_size"]), width=width,
        layers=int(facts["vision_layers"]), mlp_dim=int(facts["vision_mlp_dim"] or 4 * width),
        heads=base.vision.heads if name else max(1, width // 64), embed_dim=int(facts.get("embed_dim") or width),
        act=act,
    )
    text = None
    if "text_width" in facts:
        tw = int(facts["text_width"])
        text = TextConfig(
            context_length=int(facts["context_length"]), vocab_size=int(facts["vocab_size"]), width=tw,
            layers=int(facts["text_layers"]), heads=base.text.heads if name and base.text else max(1, tw // 64),
            embed_dim=vision.embed_dim, act=act,
        )
    scale = weights.state_dict.get("logit_scale")
    init = float(scale) if scale is not None and scale.numel() == 1 else CLIPConfig.init_logit_scale
    return CLIPConfig(vision=vision, text=text, init_logit_scale=init)


def _short(keys, n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
