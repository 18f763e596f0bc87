"""Alpha-CLIP image towers as timm models, registered on import.

The models are timm ``VisionTransformer``s whose patch embedding also embeds alpha. The input is RGBA
``[B, 4, H, W]``: the pretrained config's mean/std carry the alpha statistics (0.5, 0.26), so timm's
``resolve_data_config`` + ``create_transform`` turn an RGBA image into the encoded input. A 3-channel
input is the whole image. No weights can be downloaded; pass the file you hold::

    import alphaclip_plugins.integrations.timm  # registers alphaclip_vit_*
    model = timm.create_model(
        "alphaclip_vit_base_patch16_224.grit1m", pretrained=True,
        pretrained_cfg_overlay=dict(file="clip_b16_grit1m_fultune_8xe.pth"))

Every layout the core reads loads that way: official ``.pth``, OpenAI ``.pt`` (the ``.openai`` tags:
CLIP with a zero alpha conv), open_clip, Hugging Face and timm files.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Any, Dict, Mapping, Tuple

from . import require

require("timm", "timm")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.layers import Format, LayerNorm, PatchEmbed, nchw_to, resample_patch_embed  # noqa: E402
from timm.models import (  # noqa: E402
    build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg,
)
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_filter_fn  # noqa: E402
from torch import nn  # noqa: E402

from ..core.alpha import ALPHA_BACKGROUND, RGBA_MEAN, RGBA_STD, tracing  # noqa: E402
from ..core.config import VisionConfig, get_config  # noqa: E402
from ..core.convert import from_alphaclip, strip_wrappers  # noqa: E402
from ..core.io import CheckpointError, PathLike, read_state_dict  # noqa: E402
from ..core.vision import prepare_alpha, split_rgba  # noqa: E402
from ..core.weights import read_weights, resolve  # noqa: E402

__all__ = ["AlphaPatchEmbed", "AlphaVisionTransformer", "checkpoint_filter_fn", "RELEASE_FILES"]

_ALPHA_KEY = "patch_embed.proj_alpha.weight"


class AlphaPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` for RGBA: ``proj`` embeds RGB, ``proj_alpha`` the alpha channel, and the two are summed.

    Both convs are bias-free like CLIP's ``conv1``/``conv1_alpha``; ``proj_alpha`` starts at zero, so a
    fresh model equals CLIP. ``in_chans`` must be 4 (the nominal input); 3-channel inputs still work and
    mean the whole image (alpha +1.9231 everywhere).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 4, embed_dim: int = 768, bias: bool = False,
                 **kwargs: Any):
        if in_chans != 4:
            raise ValueError(
                f"Alpha-CLIP models take RGBA input, in_chans=4 (got {in_chans}); leave in_chans unset. "
                f"A 3-channel input at run time is read as the whole image"
            )
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim, bias=bias, **kwargs)
        dd = {k: kwargs[k] for k in ("device", "dtype") if k in kwargs}
        self.proj_alpha = nn.Conv2d(1, embed_dim, self.patch_size, self.patch_size, bias=False, **dd)
        nn.init.zeros_(self.proj_alpha.weight)
        self.alpha_pad_value = ALPHA_BACKGROUND  # an attribute, as TorchScript reads no float globals

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RGBA ``[B, 4, H, W]`` (or RGB ``[B, 3, H, W]``: whole image) -> tokens, ``[B, h*w, C]`` by default."""
        rgb, alpha = split_rgba(x, None)
        if not torch.jit.is_scripting():
            self._check_size(rgb)
        if self.dynamic_img_pad:
            H, W = rgb.shape[-2:]
            pad_h = (self.patch_size[0] - H % self.patch_size[0]) % self.patch_size[0]
            pad_w = (self.patch_size[1] - W % self.patch_size[1]) % self.patch_size[1]
            rgb = F.pad(rgb, (0, pad_w, 0, pad_h))
            # Padding is outside the region, as in the reference pipeline's zero-padded RGBA images.
            alpha = F.pad(alpha, (0, pad_w, 0, pad_h), value=self.alpha_pad_value)
        x = self.proj(rgb)
        x = x + self.proj_alpha(prepare_alpha(alpha, self.proj_alpha.weight.dtype)).to(x.dtype)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)

    @torch.jit.unused
    def _check_size(self, rgb: torch.Tensor) -> None:
        """Clear errors for a wrong input size, in eager mode (a captured graph has no Python checks)."""
        if self.img_size is None or tracing():
            return
        H, W = rgb.shape[-2:]
        if self.strict_img_size and (H, W) != tuple(self.img_size):
            raise ValueError(
                f"input is {H}x{W} but the model takes {self.img_size[0]}x{self.img_size[1]}; resize it, or create "
                f"the model with dynamic_img_size=True (or call set_input_size)"
            )
        if not self.dynamic_img_pad and (H % self.patch_size[0] or W % self.patch_size[1]):
            raise ValueError(
                f"input size {H}x{W} is not a multiple of the patch size {self.patch_size}; resize it, or create "
                f"the model with dynamic_img_pad=True"
            )

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """As ``PatchEmbed.set_input_size``; a new patch size resamples ``proj_alpha`` like ``proj``."""
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        old = self.proj_alpha
        if tuple(old.kernel_size) != tuple(self.patch_size):
            new = nn.Conv2d(1, old.out_channels, self.patch_size, self.patch_size, bias=False,
                            device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(resample_patch_embed(old.weight, list(self.patch_size)))
            new.weight.requires_grad_(old.weight.requires_grad)
            self.proj_alpha = new.train(old.training)


class AlphaVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` with :class:`AlphaPatchEmbed`: RGBA input ``[B, 4, H, W]``.

    Everything else is timm's: ``forward_features``/``forward_head``, ``forward_intermediates``,
    ``features_only``, ``reset_classifier``, ``set_grad_checkpointing``, ``dynamic_img_size``,
    ``set_input_size``. As CLIP, ``head`` is the image projection (``head.weight = proj.T``, zero bias).
    """

    def __init__(self, in_chans: int = 4, embed_layer=AlphaPatchEmbed, **kwargs: Any):
        if not (isinstance(embed_layer, type) and issubclass(embed_layer, AlphaPatchEmbed)):
            raise ValueError("embed_layer must be an AlphaPatchEmbed (sub)class: it is what embeds the alpha channel")
        super().__init__(in_chans=in_chans, embed_layer=embed_layer, **kwargs)
        self._register_load_state_dict_pre_hook(self._convert_foreign)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset)
        nn.init.zeros_(self.patch_embed.proj_alpha.weight)  # any init scheme: a fresh model equals CLIP

    @torch.jit.ignore()
    def load_pretrained(self, checkpoint_path: PathLike, prefix: str = "") -> None:
        """Load a checkpoint file or directory of any layout the core reads (``pretrained_cfg_overlay=dict(file=...)``).

        Raises:
            CheckpointError: unreadable file, another architecture, or weights that do not fit (named).
        """
        source = str(checkpoint_path)
        result = self.load_state_dict(checkpoint_filter_fn(read_state_dict(checkpoint_path), self, source), strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("head.")]  # a new head starts fresh
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"{source} does not fit {type(self).__name__}: missing {missing or 'nothing'}, unexpected "
                f"{result.unexpected_keys or 'nothing'}. Check that the file holds an Alpha-CLIP or CLIP ViT tower"
            )

    def _convert_foreign(self, state_dict: Dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        """``load_state_dict`` pre-hook: a state dict of another layout (``create_model(checkpoint_path=...)``,
        a plain ``load_state_dict``) is converted by :func:`checkpoint_filter_fn` first."""
        if prefix or _ALPHA_KEY in state_dict:  # this model's own layout
            return
        converted = checkpoint_filter_fn(dict(state_dict), self)
        state_dict.clear()
        state_dict.update(converted)


def _tower_config(model: VisionTransformer, embed_dim: int) -> VisionConfig:
    """The core config of a timm CLIP ViT's tower, read from its modules."""
    blk, pe = model.blocks[0], model.patch_embed
    size = pe.img_size or pe.grid_size
    return VisionConfig(
        image_size=size[0], patch_size=pe.patch_size[0], width=model.embed_dim, layers=len(model.blocks),
        heads=blk.attn.num_heads, mlp_dim=blk.mlp.fc1.out_features, embed_dim=embed_dim,
    )


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: VisionTransformer, source: str = "the checkpoint"
) -> Dict[str, torch.Tensor]:
    """Turn a state dict of any supported layout into this model's timm state dict.

    A timm checkpoint of these models (it has ``patch_embed.proj_alpha``) goes through timm's own filter.
    Every other layout (official Alpha-CLIP release, OpenAI CLIP, open_clip, Hugging Face, timm CLIP)
    goes through the core resolver: a plain CLIP gets a zero ``proj_alpha``, the text tower is dropped,
    positions are resampled to the model's grid, and the architecture and keys are checked. A projection
    whose shape differs from the model's head (``num_classes=N``) is dropped: timm starts a new head.

    Raises:
        CheckpointError: the file holds another architecture, or weights that do not fit (named).
    """
    sd = strip_wrappers(state_dict)
    if _ALPHA_KEY in sd:  # this model's own layout (e.g. a timm training checkpoint)
        out = _vit_filter_fn(sd, model)
        file_dim = out["head.weight"].shape[0] if "head.weight" in out else 0
    else:
        weights = read_weights(sd, source)
        file_dim = int(weights.facts().get("embed_dim") or 0)
        tower, report = resolve(weights, _tower_config(model, file_dim or model.embed_dim), strict=False)
        report.check(allow_missing=("proj",) if _new_head(model, file_dim) else ())
        out = from_alphaclip({"visual." + k: v for k, v in tower.items()}, "timm")
    if _new_head(model, file_dim):
        out.pop("head.weight", None)
        out.pop("head.bias", None)
    return out


def _new_head(model: VisionTransformer, file_dim: int) -> bool:
    """True when the model's head cannot take the file's projection (``num_classes=N``, or no head)."""
    head = getattr(model, "head", None)
    return not (isinstance(head, nn.Linear) and head.out_features == file_dim and head.in_features == model.embed_dim)


def _vision(variant: str) -> VisionConfig:
    """The core vision config of a timm variant (with its timm-only overrides)."""
    arch, overrides = _ARCHS[variant]
    return get_config(arch).replace(**{f"vision_{k}": v for k, v in overrides.items()}).vision


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> AlphaVisionTransformer:
    v = _vision(variant)
    model_args = dict(
        patch_size=v.patch_size, embed_dim=v.width, depth=v.layers, num_heads=v.heads, mlp_ratio=v.mlp_dim / v.width,
        pre_norm=True, norm_layer=partial(LayerNorm, eps=v.ln_eps), act_layer=v.act,
    )
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = _weights_overlay(variant, kwargs)
    out_indices = kwargs.pop("out_indices", min(3, v.layers))
    return build_model_with_cfg(
        AlphaVisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(model_args, **kwargs),
    )


def _weights_overlay(variant: str, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``pretrained_cfg_overlay`` to build with: a local file is read by the core loader (``custom_load``)."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=overlay)
    name = f"{variant}.{cfg.tag}" if cfg.tag else variant
    if cfg.state_dict or cfg.url or cfg.hf_hub_id:
        return overlay
    if cfg.file and ("file" in overlay or os.path.exists(cfg.file)):
        # timm's reader takes neither OpenAI's TorchScript archives nor checkpoint directories; the core's does.
        overlay.setdefault("custom_load", True)
        return overlay
    file = RELEASE_FILES.get(name, "")
    raise ValueError(
        f"{name} has no download location: its weights are "
        + (f"the file {file}. " if file else "a checkpoint file you provide. ")
        + f"Pass it with timm.create_model({name!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='/path/to/{file or 'weights.safetensors'}'))"
    )


#: The timm names, the core architecture of each, and the release file behind each pretrained tag.
#: The tiny test variant has 3 blocks (the core ``tiny`` has 2): timm's feature tests take the last 3.
_ARCHS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "alphaclip_vit_base_patch16_224": ("ViT-B/16", {}), "alphaclip_vit_large_patch14_224": ("ViT-L/14", {}),
    "alphaclip_vit_large_patch14_336": ("ViT-L/14@336", {}), "alphaclip_vit_tiny_patch8_32": ("tiny", dict(layers=3)),
}
RELEASE_FILES: Dict[str, str] = {
    "alphaclip_vit_base_patch16_224.grit1m": "clip_b16_grit1m_fultune_8xe.pth",
    "alphaclip_vit_base_patch16_224.grit20m": "clip_b16_grit20m_fultune_2xe.pth",
    "alphaclip_vit_base_patch16_224.grit1m_mim": "clip_b16_grit+mim_fultune_4xe.pth",
    "alphaclip_vit_base_patch16_224.openai": "ViT-B-16.pt",
    "alphaclip_vit_large_patch14_224.grit1m": "clip_l14_grit1m_fultune_8xe.pth",
    "alphaclip_vit_large_patch14_224.grit20m": "clip_l14_grit20m_fultune_2xe.pth",
    "alphaclip_vit_large_patch14_224.grit1m_mim": "clip_l14_grit+mim_fultune_6xe.pth",
    "alphaclip_vit_large_patch14_224.openai": "ViT-L-14.pt",
    "alphaclip_vit_large_patch14_336.grit1m": "clip_l14_336_grit1m_fultune_8xe.pth",
    "alphaclip_vit_large_patch14_336.grit20m": "clip_l14_336_grit_20m_4xe.pth",
    "alphaclip_vit_large_patch14_336.openai": "ViT-L-14-336px.pt",
}
# The tiny test variant has no released weights; its tags mirror ViT-B/16's so every loading path can be tested.
_TAGS: Dict[str, Tuple[str, ...]] = {
    "alphaclip_vit_base_patch16_224": ("grit1m", "grit20m", "grit1m_mim", "openai"),
    "alphaclip_vit_large_patch14_224": ("grit1m", "grit20m", "grit1m_mim", "openai"),
    "alphaclip_vit_large_patch14_336": ("grit1m", "grit20m", "openai"),
    "alphaclip_vit_tiny_patch8_32": ("grit1m", "grit20m", "grit1m_mim", "openai"),
}


def _cfg(variant: str, tag: str) -> Dict[str, Any]:
    """A tag's pretrained cfg. ``file`` is the release file's name (so that ``timm.list_pretrained`` lists the
    tag); it loads from the working directory, or from the path given by ``pretrained_cfg_overlay=dict(file=...)``."""
    v = _vision(variant)
    file = RELEASE_FILES.get(f"{variant}.{tag}")
    openai = tag == "openai"
    if file:
        note = ("OpenAI CLIP with a zero alpha conv (equals CLIP)" if openai else "Alpha-CLIP release") + f" {file}"
    else:
        note = "test variant, no released weights"
    paper = _PAPERS["openai" if openai else "alphaclip"]
    return dict(
        url="", file=file, num_classes=v.embed_dim, input_size=(4, v.image_size, v.image_size), pool_size=None,
        crop_pct=1.0, interpolation="bicubic", fixed_input_size=True, mean=RGBA_MEAN, std=RGBA_STD,
        first_conv="patch_embed.proj", classifier="head", **paper,
        notes=(f"{note}; pass pretrained_cfg_overlay=dict(file=PATH)",),
    )


#: The paper and license fields timm's CLIP configs carry. Alpha-CLIP's checkpoints are for research use only.
_PAPERS: Dict[str, Dict[str, str]] = {
    "alphaclip": dict(
        paper_name="Alpha-CLIP: A CLIP Model Focusing on Wherever You Want", paper_ids="arXiv:2312.03818",
        origin_url="https://github.com/SunzeY/AlphaCLIP", license="cc-by-nc-4.0",
    ),
    "openai": dict(
        paper_name="Learning Transferable Visual Models From Natural Language Supervision",
        paper_ids="arXiv:2103.00020", origin_url="https://github.com/openai/CLIP", license="mit",
    ),
}


default_cfgs = generate_default_cfgs({f"{m}.{t}": _cfg(m, t) for m, tags in _TAGS.items() for t in tags})


@register_model
def alphaclip_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> AlphaVisionTransformer:
    """Alpha-CLIP ViT-B/16 image tower @ 224x224, RGBA input, QuickGELU."""
    return _create("alphaclip_vit_base_patch16_224", pretrained, **kwargs)


@register_model
def alphaclip_vit_large_patch14_224(pretrained: bool = False, **kwargs: Any) -> AlphaVisionTransformer:
    """Alpha-CLIP ViT-L/14 image tower @ 224x224, RGBA input, QuickGELU."""
    return _create("alphaclip_vit_large_patch14_224", pretrained, **kwargs)


@register_model
def alphaclip_vit_large_patch14_336(pretrained: bool = False, **kwargs: Any) -> AlphaVisionTransformer:
    """Alpha-CLIP ViT-L/14 image tower @ 336x336, RGBA input, QuickGELU."""
    return _create("alphaclip_vit_large_patch14_336", pretrained, **kwargs)


@register_model
def alphaclip_vit_tiny_patch8_32(pretrained: bool = False, **kwargs: Any) -> AlphaVisionTransformer:
    """A tiny Alpha-CLIP tower for tests (core architecture ``tiny`` with 3 blocks: 32 px, patch 8, width 64)."""
    return _create("alphaclip_vit_tiny_patch8_32", pretrained, **kwargs)
