"""Alpha-CLIP for open_clip: make an open_clip CLIP region-aware in place, and convert it to and from the core.

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16-quickgelu", pretrained="openai")
    alphafy(model)  # adds a zero alpha conv: still exactly CLIP
    load_alpha_checkpoint(model, "clip_b16_grit1m_fultune_8xe.pth")
    features = model.encode_image(image, alpha)  # alpha [B, 1, H, W] encoded; None = whole image

Tokenizer, transforms and losses stay open_clip's. Alpha travels with the image (as an argument or a
4th channel), never through module state, so batches and threads are safe.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Dict, Optional, Union

from . import require

require("open_clip", "open_clip")

import torch  # noqa: E402
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP  # noqa: E402
from open_clip.transformer import QuickGELU  # noqa: E402
from open_clip.transformer import VisionTransformer as OpenCLIPVisionTransformer  # noqa: E402
from torch import nn  # noqa: E402

from ..core.checkpoint import LoadResult, check_architecture, load_state_dict  # noqa: E402
from ..core.config import Activation, CLIPConfig, TextConfig, VisionConfig  # noqa: E402
from ..core.convert import detect_format, strip_prefix, to_alphaclip  # noqa: E402
from ..core.io import PathLike, read_state_dict  # noqa: E402
from ..core.model import AlphaCLIP  # noqa: E402
from ..core.vision import embed_alpha, split_rgba  # noqa: E402

__all__ = [
    "alphafy", "merge_alpha", "core_config", "open_clip_config", "to_core", "from_core", "load_alpha_checkpoint",
]

OpenCLIPModel = Union[CLIP, CustomTextCLIP]


def merge_alpha(image: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``image [B, 3, H, W]`` and encoded ``alpha [B, 1, H, W]`` -> RGBA ``[B, 4, H, W]``.

    With ``alpha=None`` the image passes unchanged (3 channels: whole image; 4: alpha already inside).
    An image batch of 1 is shared by a batch of alphas (one image, many regions).
    """
    if isinstance(alpha, bool):
        raise TypeError(
            "alpha must be a tensor or None; pass normalize by keyword: encode_image(image, normalize=True)"
        )
    if alpha is None:
        return image
    rgb, alpha = split_rgba(image, alpha)
    if rgb.shape[0] != alpha.shape[0]:
        rgb = rgb.expand(alpha.shape[0], -1, -1, -1)
    return torch.cat([rgb, alpha.to(rgb.dtype)], dim=1)


def _rgba_conv1(visual: OpenCLIPVisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """``visual.conv1``'s forward once alphafied: ``conv1(rgb) + conv1_alpha(alpha)`` -> ``[B, width, h, w]``."""
    rgb, alpha = split_rgba(x, None)
    conv1, conv1_alpha = visual.conv1, visual.conv1_alpha
    out = type(conv1).forward(conv1, rgb)  # the class's forward: this function replaced the instance's
    return out + embed_alpha(conv1_alpha, alpha).to(out.dtype)


class _AlphaMixin:
    """The image entry points with an ``alpha`` argument; everything else is open_clip's."""

    def encode_image(self, image: torch.Tensor, alpha: Optional[torch.Tensor] = None, normalize: bool = False):
        """Image features ``[B, embed_dim]``.

        Args:
            image: ``[B, 3, H, W]``, or ``[B, 4, H, W]`` with encoded alpha as the 4th channel.
            alpha: encoded alpha ``[B, 1, H, W]``; None = whole image. An image batch of 1 may take many alphas.
            normalize: L2-normalise the features.
        """
        return super().encode_image(merge_alpha(image, alpha), normalize=normalize)

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                alpha: Optional[torch.Tensor] = None):
        """As open_clip's ``forward``, with the image's ``alpha``."""
        if image is None and alpha is not None:
            raise ValueError("alpha was given without an image")
        return super().forward(merge_alpha(image, alpha) if image is not None else None, text)

    def get_logits(self, image: torch.Tensor, text: torch.Tensor, alpha: Optional[torch.Tensor] = None):
        """As open_clip's ``get_logits``, with the image's ``alpha``."""
        return super().get_logits(merge_alpha(image, alpha), text)

    def forward_intermediates(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None, *,
                              alpha: Optional[torch.Tensor] = None, **kwargs: Any):
        """As open_clip's ``forward_intermediates``, with the image's ``alpha``."""
        if image is None and alpha is not None:
            raise ValueError("alpha was given without an image")
        return super().forward_intermediates(merge_alpha(image, alpha) if image is not None else None, text, **kwargs)


class AlphaOpenCLIP(_AlphaMixin, CLIP):
    """An open_clip ``CLIP`` after :func:`alphafy`."""


class AlphaCustomTextCLIP(_AlphaMixin, CustomTextCLIP):
    """An open_clip ``CustomTextCLIP`` after :func:`alphafy`."""


_ALPHA_CLASSES = {CLIP: AlphaOpenCLIP, CustomTextCLIP: AlphaCustomTextCLIP}


def alphafy(model: OpenCLIPModel) -> OpenCLIPModel:
    """Turn an open_clip CLIP into Alpha-CLIP in place, and return it.

    Adds ``visual.conv1_alpha`` (zero-initialised, so outputs are unchanged until it is trained or
    loaded) whose output is added to ``visual.conv1``'s, and an ``alpha`` argument to ``encode_image``,
    ``forward``, ``get_logits`` and ``forward_intermediates``. Calling it twice is harmless.

    Raises:
        TypeError: the model is not an open_clip ``CLIP``/``CustomTextCLIP`` with open_clip's ViT.
    """
    cls = _ALPHA_CLASSES.get(type(model), type(model))
    if cls not in _ALPHA_CLASSES.values():
        raise TypeError(
            f"alphafy takes an open_clip CLIP or CustomTextCLIP, got {type(model).__name__}; "
            f"create the model with open_clip.create_model('ViT-...')"
        )
    visual = model.visual
    if not isinstance(visual, OpenCLIPVisionTransformer):
        raise TypeError(
            f"the image tower is {type(visual).__name__}, but Alpha-CLIP needs open_clip's VisionTransformer "
            f"(a ViT config such as 'ViT-B-16'); ResNet and timm towers are not supported"
        )
    if not isinstance(getattr(visual, "conv1_alpha", None), nn.Conv2d):
        w = visual.conv1.weight
        visual.conv1_alpha = nn.Conv2d(1, w.shape[0], visual.conv1.kernel_size, visual.conv1.stride, bias=False,
                                       device=w.device, dtype=w.dtype)
        nn.init.zeros_(visual.conv1_alpha.weight)
    # A partial (not a closure) so the model still deep-copies and pickles.
    visual.conv1.forward = functools.partial(_rgba_conv1, visual)
    model.__class__ = cls
    return model


def _activation(block: nn.Module) -> Activation:
    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ValueError(f"unsupported activation {type(act).__name__}; Alpha-CLIP uses QuickGELU or exact GELU")


def _vision_config(visual: nn.Module) -> VisionConfig:
    if not isinstance(visual, OpenCLIPVisionTransformer):
        raise TypeError(f"the image tower is {type(visual).__name__}; only open_clip's VisionTransformer converts")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.image_size[0] != visual.image_size[1]:
        raise ValueError("only square ViTs pooled at the class token (standard CLIP) convert to Alpha-CLIP")
    block = visual.transformer.resblocks[0]
    if not isinstance(block.attn, nn.MultiheadAttention):
        raise ValueError("only open_clip's default attention blocks convert (no qk-norm or scaled-cosine blocks)")
    return VisionConfig(
        image_size=visual.image_size[0], patch_size=visual.patch_size[0], width=visual.conv1.out_channels,
        layers=len(visual.transformer.resblocks), heads=block.attn.num_heads, mlp_dim=block.mlp.c_fc.out_features,
        embed_dim=visual.proj.shape[1], act=_activation(block), ln_eps=visual.ln_post.eps,
    )


def _text_config(tower: nn.Module) -> TextConfig:
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", ""))
    if not hasattr(tower, "token_embedding") or pool != "argmax":
        raise ValueError("only open_clip's own text transformer pooled at the end-of-text token (argmax) converts")
    if getattr(tower, "attn_mask", None) is None or not isinstance(tower.text_projection, nn.Parameter):
        raise ValueError("only causal text towers with a plain projection matrix (standard CLIP) convert")
    block = tower.transformer.resblocks[0]
    return TextConfig(
        context_length=tower.context_length, vocab_size=tower.vocab_size, width=tower.transformer.width,
        layers=tower.transformer.layers, heads=block.attn.num_heads, embed_dim=tower.text_projection.shape[1],
        act=_activation(block), ln_eps=tower.ln_final.eps,
    )


def core_config(model: OpenCLIPModel) -> CLIPConfig:
    """The core :class:`CLIPConfig` of an open_clip CLIP (whether alphafied or not)."""
    text = model.text if isinstance(model, CustomTextCLIP) else model
    logit_scale = model.logit_scale.detach()
    # A model on the meta device (shapes only) has no value to read: keep the config's default.
    scale = CLIPConfig.init_logit_scale if logit_scale.is_meta else float(logit_scale.reshape(-1)[0])
    return CLIPConfig(vision=_vision_config(model.visual), text=_text_config(text), init_logit_scale=scale)


def to_core(model: OpenCLIPModel) -> AlphaCLIP:
    """A core :class:`AlphaCLIP` with a copy of ``model``'s weights (a zero alpha conv if not alphafied).

    Raises:
        TypeError: the image tower is not open_clip's VisionTransformer.
        ValueError: the model is not a standard CLIP (the message names what differs).
    """
    cfg = core_config(model)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if isinstance(model, CustomTextCLIP):
        sd = {k[5:] if k.startswith("text.") else k: v for k, v in sd.items()}
    if "visual.conv1_alpha.weight" not in sd:
        w = sd["visual.conv1.weight"]
        sd["visual.conv1_alpha.weight"] = w.new_zeros(w.shape[0], 1, *w.shape[-2:])
    with torch.device("meta"):  # no random init: every weight is assigned below
        core = AlphaCLIP(cfg)
    own = set(core.state_dict())
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or unexpected:
        raise ValueError(
            f"the open_clip model does not have Alpha-CLIP's layout: missing {missing or 'nothing'}, unexpected "
            f"{unexpected or 'nothing'}; only standard ViT CLIPs convert (no layer scale, text class token, logit bias)"
        )
    core.load_state_dict(sd, strict=True, assign=True)
    return core.train(model.training)


def _mlp_ratio(mlp_dim: int, width: int) -> float:
    ratio = mlp_dim / width
    return ratio if int(width * ratio) == mlp_dim else (mlp_dim + 0.5) / width  # open_clip truncates width * ratio


def _norm_kwargs(eps: float) -> Optional[Dict[str, Any]]:
    return None if eps == 1e-5 else {"eps": eps}


def open_clip_config(cfg: CLIPConfig) -> Dict[str, Any]:
    """The ``open_clip.model.CLIP`` constructor arguments of a core config: ``CLIP(**open_clip_config(cfg))``.

    Raises:
        ValueError: no text tower, or towers open_clip's CLIP cannot build (different activations or sizes).
    """
    v, t = cfg.vision, cfg.text
    if t is None:
        raise ValueError("open_clip's CLIP has two towers; this config is vision-only")
    if v.act != t.act or v.embed_dim != t.embed_dim:
        raise ValueError(
            f"open_clip's CLIP shares one activation and embedding size between towers; got vision "
            f"({v.act}, {v.embed_dim}) and text ({t.act}, {t.embed_dim})"
        )
    vision_cfg = CLIPVisionCfg(
        layers=v.layers, width=v.width, head_width=v.width // v.heads, mlp_ratio=_mlp_ratio(v.mlp_dim, v.width),
        patch_size=v.patch_size, image_size=v.image_size, norm_kwargs=_norm_kwargs(v.ln_eps),
    )
    text_cfg = CLIPTextCfg(
        context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads, layers=t.layers,
        mlp_ratio=_mlp_ratio(t.mlp_dim, t.width), norm_kwargs=_norm_kwargs(t.ln_eps),
    )
    return dict(embed_dim=v.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=v.act == "quick_gelu",
                init_logit_scale=cfg.init_logit_scale)


def from_core(model: AlphaCLIP) -> AlphaOpenCLIP:
    """An alphafied open_clip ``CLIP`` with a copy of a core :class:`AlphaCLIP`'s weights.

    Raises:
        TypeError: ``model`` is not a two-tower core ``AlphaCLIP``.
        ValueError: see :func:`open_clip_config`.
    """
    if not isinstance(model, AlphaCLIP):
        raise TypeError(f"from_core takes a core AlphaCLIP, got {type(model).__name__}")
    out = alphafy(CLIP(**open_clip_config(model.cfg)))
    p = next(model.parameters())
    out.to(device=p.device, dtype=p.dtype)
    out.load_state_dict(model.state_dict(), strict=True)
    return out.train(model.training)


def load_alpha_checkpoint(model: OpenCLIPModel, path: PathLike, strict: bool = True) -> LoadResult:
    """Load an Alpha-CLIP image tower (e.g. an official ``clip_*_grit*.pth``) into ``model.visual``.

    The model is alphafied first if it is not yet. Any layout the core reads works; a full Alpha-CLIP
    checkpoint contributes its image tower only (the text tower stays the model's).

    Raises:
        CheckpointError: the file holds another architecture, or (strict) keys are missing or unexpected.
    """
    alphafy(model)
    sd = read_state_dict(path)
    vision = _vision_config(model.visual)
    canon = {k: v for k, v in to_alphaclip(sd).items() if k.startswith("visual.")}
    check_architecture(CLIPConfig(vision=vision), canon, str(path))
    if detect_format(strip_prefix(sd, "module.")) == "official" and vision.act != "quick_gelu":
        warnings.warn(
            f"{path} is an official Alpha-CLIP release, trained with QuickGELU, but the model uses GELU; "
            f"create it as '<arch>-quickgelu' (e.g. 'ViT-B-16-quickgelu') to get the published results",
            stacklevel=2,
        )
    return load_state_dict(model.visual, sd, strict=strict, source=str(path), prefix="visual.")
