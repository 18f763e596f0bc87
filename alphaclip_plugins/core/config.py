"""Architectures, declared once as data.

Every variant is a frozen :class:`CLIPConfig`; :data:`ARCHITECTURES` maps the public names
(``"ViT-B/16"``) to them. Other modules read these fields and never hard-code a width.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Mapping

Activation = Literal["quick_gelu", "gelu"]


@dataclass(frozen=True)
class VisionConfig:
    """The image tower: an OpenAI CLIP ViT plus the alpha patch embedding."""

    image_size: int = 224  # native square input size in pixels
    patch_size: int = 16  # side of a patch; conv1 and conv1_alpha use it as kernel and stride
    width: int = 768  # token dimension
    layers: int = 12  # number of residual attention blocks
    heads: int = 12  # attention heads (width must divide evenly)
    mlp_dim: int = 3072  # hidden size of each block's MLP
    embed_dim: int = 512  # output of the projection `proj` (the joint embedding size)
    act: Activation = "quick_gelu"  # OpenAI weights use QuickGELU, LAION/open_clip weights GELU
    ln_eps: float = 1e-5  # LayerNorm epsilon

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    """The CLIP text tower (causal transformer, pooled at the end-of-text token)."""

    context_length: int = 77  # tokens per caption, incl. start and end tokens
    vocab_size: int = 49408  # CLIP BPE vocabulary
    width: int = 512  # token dimension
    layers: int = 12  # number of residual attention blocks
    heads: int = 8  # attention heads
    embed_dim: int = 512  # output of `text_projection`
    act: Activation = "quick_gelu"  # must match the weights, like the vision tower's
    ln_eps: float = 1e-5  # LayerNorm epsilon

    @property
    def mlp_dim(self) -> int:
        return 4 * self.width


@dataclass(frozen=True)
class CLIPConfig:
    """A two-tower Alpha-CLIP model. ``text`` is None for a vision-only model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig | None = field(default_factory=TextConfig)
    init_logit_scale: float = 4.6052  # log(100): the value of released CLIP models

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        """The inverse of :meth:`to_dict`, checked (:meth:`check`) before any model of its size is built."""
        if not isinstance(d, Mapping) or not isinstance(d.get("vision"), Mapping):
            raise ValueError("a config is a mapping with a 'vision' section (and optionally 'text')")
        text = d.get("text")
        for name, section, kind in (("vision", d["vision"], VisionConfig), ("text", text or {}, TextConfig)):
            unknown = set(section) - {f.name for f in dataclasses.fields(kind)}
            if unknown:
                raise ValueError(f"config section {name!r} has unknown fields {sorted(unknown)}")
        cfg = cls(
            vision=VisionConfig(**d["vision"]),
            text=TextConfig(**text) if text is not None else None,
            init_logit_scale=d.get("init_logit_scale", 4.6052),
        )
        cfg.check()
        return cfg

    def check(self) -> None:
        """Refuse sizes no model has (zero, negative, absurdly large, inconsistent) before anything is allocated.

        Raises:
            ValueError: naming the field and the value.
        """
        for tower, sub in (("vision", self.vision), ("text", self.text)):
            if sub is None:
                continue
            for f in dataclasses.fields(sub):
                value, limit = getattr(sub, f.name), _LIMITS.get(f.name)
                if limit is None:
                    continue
                if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                    raise ValueError(f"{tower}_{f.name} = {value!r} is not a plausible size; expected a whole "
                                     f"number in [1, {limit}]")
            if sub.width % sub.heads:
                raise ValueError(f"{tower}_width {sub.width} is not divisible by {tower}_heads {sub.heads}")
        if self.vision.patch_size > self.vision.image_size:
            raise ValueError(f"vision_patch_size {self.vision.patch_size} exceeds vision_image_size "
                             f"{self.vision.image_size}")
        if not math.isfinite(self.init_logit_scale):
            raise ValueError(f"init_logit_scale {self.init_logit_scale} is not finite")

    def replace(self, **overrides: Any) -> "CLIPConfig":
        """Copy with overrides; ``vision_*``/``text_*`` keys reach into the towers (``vision_image_size=336``)."""
        vision = {k[7:]: v for k, v in overrides.items() if k.startswith("vision_")}
        text = {k[5:]: v for k, v in overrides.items() if k.startswith("text_")}
        rest = {k: v for k, v in overrides.items() if not k.startswith(("vision_", "text_"))}
        check_override_keys(overrides)
        cfg = dataclasses.replace(self, **rest)
        if vision:
            cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vision))
        if text:
            if cfg.text is None:
                raise TypeError("this architecture has no text tower to override")
            cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text))
        cfg.check()
        return cfg


def check_override_keys(keys: Any) -> None:
    """Refuse override names that are no config field, naming them as typed (``vision_widht``).

    Raises:
        TypeError: for unknown names.
    """
    fields = {"vision_": VisionConfig, "text_": TextConfig}
    top = {f.name for f in dataclasses.fields(CLIPConfig)} - {"vision", "text"}
    for key in keys:
        prefix = next((p for p in fields if key.startswith(p)), None)
        if prefix is None and key not in top:
            raise TypeError(f"unknown config override {key!r}; use vision_<field>, text_<field> or init_logit_scale")
        names = [f.name for f in dataclasses.fields(fields[prefix])] if prefix else []
        if prefix and key[len(prefix):] not in names:
            raise TypeError(f"unknown config override {key!r}; {prefix}<field> takes one of {names}")


# Upper bounds of the size fields: far above every released model (ViT-bigG: width 1664, 48 layers), far
# below what would exhaust memory by mistake.
_LIMITS = {
    "image_size": 8192, "patch_size": 1024, "width": 16384, "layers": 512, "heads": 1024, "mlp_dim": 65536,
    "embed_dim": 16384, "context_length": 16384, "vocab_size": 1 << 21,
}


def _clip(embed: int, v: VisionConfig, t: TextConfig) -> CLIPConfig:
    return CLIPConfig(
        vision=dataclasses.replace(v, embed_dim=embed),
        text=dataclasses.replace(t, embed_dim=embed, act=v.act),
    )


_TEXT_B = TextConfig(width=512, layers=12, heads=8)
_TEXT_L = TextConfig(width=768, layers=12, heads=12)
_TEXT_H = TextConfig(width=1024, layers=24, heads=16)
_TEXT_G = TextConfig(width=1280, layers=32, heads=20)

#: Known architectures. The first three have released Alpha-CLIP weights; the larger ones are
#: open_clip's LAION models (GELU) for training Alpha-CLIP from bigger CLIPs; ``tiny``/``tiny-gelu``
#: are for tests and the embedded demo model.
ARCHITECTURES: Dict[str, CLIPConfig] = {
    "ViT-B/32": _clip(512, VisionConfig(patch_size=32), _TEXT_B),
    "ViT-B/16": _clip(512, VisionConfig(), _TEXT_B),
    "ViT-L/14": _clip(768, VisionConfig(patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096), _TEXT_L),
    "ViT-L/14@336": _clip(
        768, VisionConfig(image_size=336, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096), _TEXT_L
    ),
    "ViT-H/14": _clip(
        1024, VisionConfig(patch_size=14, width=1280, layers=32, heads=16, mlp_dim=5120, act="gelu"), _TEXT_H
    ),
    "ViT-g/14": _clip(
        1024, VisionConfig(patch_size=14, width=1408, layers=40, heads=16, mlp_dim=6144, act="gelu"), _TEXT_H
    ),
    "ViT-bigG/14": _clip(
        1280, VisionConfig(patch_size=14, width=1664, layers=48, heads=16, mlp_dim=8192, act="gelu"), _TEXT_G
    ),
    "tiny": _clip(
        32, VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_dim=256),
        TextConfig(width=32, layers=2, heads=2),
    ),
    "tiny-gelu": _clip(
        32, VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_dim=256, act="gelu"),
        TextConfig(width=32, layers=2, heads=2),
    ),
}

#: Other spellings users type (open_clip and timm style) -> canonical name.
ALIASES: Dict[str, str] = {
    "ViT-B-32": "ViT-B/32", "ViT-B-16": "ViT-B/16", "ViT-L-14": "ViT-L/14", "ViT-L-14-336": "ViT-L/14@336",
    "ViT-L/14-336": "ViT-L/14@336", "ViT-L-14-336px": "ViT-L/14@336", "ViT-H-14": "ViT-H/14",
    "ViT-g-14": "ViT-g/14", "ViT-bigG-14": "ViT-bigG/14",
}


def canonical_name(name: str) -> str:
    """``"ViT-B-16"`` -> ``"ViT-B/16"``; ``-quickgelu`` suffixes are accepted and dropped."""
    base = name[: -len("-quickgelu")] if name.endswith("-quickgelu") else name
    base = ALIASES.get(base, base)
    if base not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return base


def get_config(name: str) -> CLIPConfig:
    """The config of a named architecture.

    Each name carries the activation of the weights that exist for it: QuickGELU for the OpenAI/Alpha-CLIP
    B and L models (also under open_clip spellings such as ``"ViT-B-16"``, since OpenAI's files are named
    so), GELU for the LAION H/g/bigG models. A ``-quickgelu`` suffix forces QuickGELU; for LAION B/L
    weights pass ``vision_act="gelu", text_act="gelu"`` to ``create_model``.
    """
    cfg = ARCHITECTURES[canonical_name(name)]
    if name.endswith("-quickgelu"):
        cfg = cfg.replace(vision_act="quick_gelu", text_act="quick_gelu")
    return cfg
