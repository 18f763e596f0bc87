"""Alpha-CLIP for open_clip: make an open_clip CLIP region-aware in place, and convert it to and from the core.

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16-quickgelu", pretrained="openai")
    alphafy(model)  # adds a zero alpha conv: still exactly CLIP
    load_alpha_checkpoint(model, "clip_b16_grit1m_fultune_8xe.pth")
    features = model.encode_image(merge_alpha(image, alpha))  # RGBA [B, 4, H, W]; 3 channels = whole image

The model keeps open_clip's class and API; tokenizer, transforms and losses stay open_clip's. Alpha
travels with the image as its 4th channel, never through module state, so batches and threads are safe.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Union

from . import require

require("open_clip", "open_clip")

import torch  # noqa: E402
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP  # noqa: E402
from open_clip.transformer import QuickGELU  # noqa: E402
from open_clip.transformer import VisionTransformer as OpenCLIPVisionTransformer  # noqa: E402
from torch import nn  # noqa: E402

from ..core.alpha import check_alpha  # noqa: E402
from ..core.config import Activation, CLIPConfig, TextConfig, VisionConfig  # noqa: E402
from ..core.convert import from_alphaclip  # noqa: E402
from ..core.io import CheckpointError, PathLike  # noqa: E402
from ..core.model import AlphaCLIP  # noqa: E402
from ..core.vision import embed_alpha, split_rgba  # noqa: E402
from ..core.weights import LoadReport, resolve  # noqa: E402

__all__ = [
    "alphafy", "merge_alpha", "AlphaConv1", "core_config", "open_clip_config", "to_core", "from_core", "load_alpha_checkpoint",
]

OpenCLIPModel = Union[CLIP, CustomTextCLIP]


def merge_alpha(image: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``image [B, 3, H, W]`` and encoded ``alpha [B, 1, H, W]`` -> RGBA ``[B, 4, H, W]``, the input of an
    alphafied model's ``encode_image`` / ``forward`` / ``forward_intermediates``.

    With ``alpha=None`` the image passes unchanged (3 channels: whole image; 4: alpha already inside).
    An image batch of 1 is shared by a batch of alphas (one image, many regions).

    Raises:
        ValueError: alpha that was not encoded (a raw 0/1 or 0-255 mask), or shapes that do not match.
    """
    if alpha is None:
        return image
    rgb, alpha = split_rgba(image, alpha)
    check_alpha(alpha)
    if rgb.shape[0] != alpha.shape[0]:
        rgb = rgb.expand(alpha.shape[0], -1, -1, -1)
    return torch.cat([rgb, alpha.to(rgb.dtype)], dim=1)


class AlphaConv1(nn.Conv2d):
    """open_clip's patch embedding ``visual.conv1`` for RGBA input: ``conv1(rgb) + alpha(alpha channel)``.

    It keeps ``conv1``'s own weight (``visual.conv1.weight``) and adds the zero-initialised alpha conv
    as ``visual.conv1.alpha``; a 3-channel input is the whole image.
    """

    def __init__(self, conv1: nn.Conv2d):
        w = conv1.weight
        super().__init__(3, conv1.out_channels, conv1.kernel_size, conv1.stride, bias=False, device="meta")
        self.weight = conv1.weight  # the same parameter: optimizers and state dicts keep seeing it
        self.alpha = nn.Conv2d(1, w.shape[0], conv1.kernel_size, conv1.stride, bias=False, device=w.device,
                               dtype=w.dtype)
        nn.init.zeros_(self.alpha.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RGBA ``[B, 4, H, W]`` (or RGB, the whole image) -> patch grid ``[B, width, H/p, W/p]``."""
        rgb, alpha = split_rgba(x, None)
        out = super().forward(rgb)
        return out + embed_alpha(self.alpha, alpha).to(out.dtype)


def alphafy(model: OpenCLIPModel) -> OpenCLIPModel:
    """Make an open_clip CLIP region-aware in place, and return it.

    ``visual.conv1`` becomes an :class:`AlphaConv1`: the model then takes RGBA input ``[B, 4, H, W]``
    (RGB + encoded alpha; :func:`merge_alpha` builds it) in open_clip's own ``encode_image``, ``forward``,
    ``get_logits`` and ``forward_intermediates``, and 3-channel input as the whole image. The alpha conv
    starts at zero, so outputs are unchanged until it is trained or loaded. The model keeps its class and
    methods; alpha travels with the image, so batches and threads are safe. Calling it twice is harmless.

    Raises:
        TypeError: the model is not an open_clip ``CLIP``/``CustomTextCLIP`` with open_clip's ViT.
    """
    if not isinstance(model, (CLIP, CustomTextCLIP)):
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
    if not isinstance(visual.conv1, AlphaConv1):
        visual.conv1 = AlphaConv1(visual.conv1)
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
    try:
        canon, _ = resolve(sd, cfg)
    except CheckpointError as e:
        raise ValueError(f"the open_clip model does not have Alpha-CLIP's layout ({e}); only standard ViT CLIPs "
                         f"convert (no layer scale, text class token, logit bias)") from None
    with torch.device("meta"):  # no random init: every weight is assigned below
        core = AlphaCLIP(cfg)
    core.load_state_dict(canon, strict=True, assign=True)
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


def from_core(model: AlphaCLIP) -> OpenCLIPModel:
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
    out.load_state_dict(from_alphaclip(model.state_dict(), "open_clip"), strict=True)
    return out.train(model.training)


def load_alpha_checkpoint(model: OpenCLIPModel, path: PathLike, strict: bool = True) -> LoadReport:
    """Load an Alpha-CLIP image tower (e.g. an official ``clip_*_grit*.pth``) into ``model.visual``.

    The model is alphafied first if it is not yet. Any layout the core reads works (through the core
    resolver); a full Alpha-CLIP checkpoint contributes its image tower only (the text tower stays the
    model's).

    Raises:
        CheckpointError: the file holds another architecture, or (strict) keys are missing or unexpected.
    """
    alphafy(model)
    vision = _vision_config(model.visual)
    tower, report = resolve(path, vision, strict=strict)
    if report.format == "official" and vision.act != "quick_gelu":
        warnings.warn(
            f"{path} is an official Alpha-CLIP release, trained with QuickGELU, but the model uses GELU; "
            f"create it as '<arch>-quickgelu' (e.g. 'ViT-B-16-quickgelu') to get the published results",
            stacklevel=2,
        )
    visual = from_alphaclip({"visual." + k: v for k, v in tower.items()}, "open_clip")
    model.visual.load_state_dict({k[len("visual."):]: v for k, v in visual.items()}, strict=False)
    return report
