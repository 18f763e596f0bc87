"""The Alpha-CLIP image tower: OpenAI CLIP's ViT plus ``conv1_alpha``, with timm's feature interface."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .alpha import ALPHA_FOREGROUND, check_alpha_if_enabled, tracing
from .config import VisionConfig
from .transformer import LayerNorm, Transformer, init_transformer_


def split_rgba(image: torch.Tensor, alpha: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Accept ``(rgb [B,3,H,W], alpha [B,1,H,W] | None)`` or ``rgba [B,4,H,W]``; return ``(rgb, alpha [B,1,H,W])``.

    A 3-channel image without alpha is the whole image: alpha +1.9231 everywhere. An alpha batch of R with
    an image batch of 1 is allowed: one image, R regions. Shapes are checked in eager mode only; the rest
    has no Python branch on shapes or values, so TorchScript and ``torch.fx`` capture it.
    """
    if not torch.jit.is_scripting():
        check_rgba_shapes(image, alpha)
    rgb = image[:, :3]
    if alpha is None:
        # The 4th channel, or (3 channels) foreground everywhere: one graph for both channel counts.
        alpha = torch.cat([image[:, 3:], torch.full_like(image[:, :1], _foreground())], dim=1)[:, :1]
    else:
        alpha = alpha.reshape(-1, 1, image.shape[-2], image.shape[-1])  # [B, H, W] or [B, 1, H, W] -> [B, 1, H, W]
    return rgb, alpha


def _foreground(value: float = ALPHA_FOREGROUND) -> float:
    # The constant comes in as a default argument: TorchScript reads no float globals.
    return value


@torch.jit.unused
def check_rgba_shapes(image: torch.Tensor, alpha: Optional[torch.Tensor]) -> None:
    """The shape checks of :func:`split_rgba` (eager mode only: skipped while a graph is captured).

    Raises:
        ValueError: not ``[B, C, H, W]``, a channel count other than 3 or 4, alpha given twice, or an alpha
            whose shape does not fit the image.
    """
    if tracing():
        return
    if image.ndim != 4:
        raise ValueError(f"image must be [B, C, H, W]; got shape {tuple(image.shape)}")
    channels = image.shape[1]
    if channels not in (3, 4):
        raise ValueError(
            f"image has {channels} channels; expected 3 (RGB, whole image) or 4 (RGB + encoded alpha)"
        )
    if alpha is None:
        return
    if channels == 4:
        raise ValueError("got a 4-channel (RGBA) image and a separate alpha; pass one or the other")
    if not (alpha.ndim == 4 and alpha.shape[1] == 1 or alpha.ndim == 3):
        raise ValueError(f"alpha must be [B, 1, H, W]; got shape {tuple(alpha.shape)}")
    if alpha.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"alpha is {tuple(alpha.shape[-2:])} but the image is {tuple(image.shape[-2:])}; "
            f"pass an alpha of the image's height and width (RegionProcessor aligns them)"
        )
    if alpha.shape[0] != image.shape[0] and image.shape[0] != 1:
        raise ValueError(
            f"alpha batch {alpha.shape[0]} does not match image batch {image.shape[0]} "
            f"(an image batch of 1 may be shared by many alphas)"
        )


@torch.jit.unused
def check_patch_multiple(image: torch.Tensor, patch_size: int) -> None:
    """Refuse an image whose height or width is not a multiple of the patch size (eager mode only)."""
    if tracing():
        return
    H, W = image.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(
            f"image size {H}x{W} is not a multiple of the patch size {patch_size}; "
            f"resize or pad it (RegionProcessor does)"
        )


def embed_alpha(conv_alpha: nn.Conv2d, alpha: Optional[torch.Tensor]) -> torch.Tensor:
    """The alpha patch embedding to add to the RGB one: ``conv_alpha(alpha)`` ``[B, C, h, w]``, or for
    ``alpha=None`` (whole image: +1.9231 everywhere) the one vector that yields, as ``[1, C, 1, 1]``.

    Every adapter (timm, open_clip, transformers) calls this, so alpha means the same everywhere. Alpha
    values are not checked here (see :func:`~alphaclip_plugins.core.alpha.check_alpha_in_forward`).
    """
    if alpha is None:
        return (conv_alpha.weight.sum(dim=(1, 2, 3)) * _foreground())[None, :, None, None]
    return conv_alpha(prepare_alpha(alpha, conv_alpha.weight.dtype))


def prepare_alpha(alpha: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Alpha cast to the alpha conv's dtype; its values are checked only where
    :func:`~alphaclip_plugins.core.alpha.check_alpha_in_forward` turned that on (eager mode).

    Modules that TorchScript compiles call ``self.conv_alpha(prepare_alpha(alpha, dtype))``: a TorchScript
    function cannot take a module argument, so they do not go through :func:`embed_alpha`.
    """
    if not torch.jit.is_scripting():
        check_alpha_if_enabled(alpha)
    return alpha.to(dtype)


def resample_pos_embed(pos: torch.Tensor, grid: Tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """Bicubic resize of the patch part of ``pos [prefix + g*g, C]`` to ``grid`` (timm's convention)."""
    old = int(round((pos.shape[0] - prefix) ** 0.5))
    if (old, old) == tuple(grid):
        return pos
    prefix_pos, patch_pos = pos[:prefix], pos[prefix:]
    # [g*g, C] -> [1, C, g, g]
    patch_pos = patch_pos.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", antialias=True, align_corners=False)
    # [1, C, h, w] -> [h*w, C]
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([prefix_pos, patch_pos], dim=0)


def _take_indices(num_blocks: int, indices: Optional[Union[int, Sequence[int]]]) -> List[int]:
    if indices is None:
        return list(range(num_blocks))
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"asked for the last {indices} blocks of {num_blocks}")
        return list(range(num_blocks - indices, num_blocks))
    out = [i + num_blocks if i < 0 else i for i in indices]
    if any(not 0 <= i < num_blocks for i in out):
        raise ValueError(f"block indices {list(indices)} out of range for {num_blocks} blocks")
    return sorted(out)


class VisionTransformer(nn.Module):
    """Alpha-CLIP's vision tower.

    ``conv1_alpha`` embeds the alpha map like ``conv1`` embeds RGB; the two are summed before the class
    token and positional embedding. It starts at zero, so a fresh tower equals CLIP.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.num_prefix_tokens = 1
        self.num_features = self.embed_dim = cfg.width  # timm's names for the token dimension
        self.output_dim = cfg.embed_dim
        width, scale = cfg.width, cfg.width**-0.5
        self.conv1 = nn.Conv2d(3, width, cfg.patch_size, cfg.patch_size, bias=False)
        self.conv1_alpha = nn.Conv2d(1, width, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid_size**2 + 1, width))
        self.ln_pre = LayerNorm(width, eps=cfg.ln_eps)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps)
        self.ln_post = LayerNorm(width, eps=cfg.ln_eps)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))
        nn.init.zeros_(self.conv1_alpha.weight)
        init_transformer_(self.transformer)
        self.frozen = False  # set by freeze(): the whole tower stays in eval mode
        self.window_size = 0  # > 0: windowed attention outside global_blocks (set_window_attention)
        self.global_blocks: Tuple[int, ...] = ()

    # --- embedding -------------------------------------------------------------------------------
    def patch_embed(self, image: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        """RGB(A) pixels -> patch grid ``[B, C, H/p, W/p]`` (RGB and alpha embeddings summed)."""
        image, alpha = split_rgba(image, alpha)
        if not torch.jit.is_scripting():
            check_patch_multiple(image, self.patch_size)
        dtype = self.conv1.weight.dtype  # inputs follow the model, so half models take fp32 pixels
        x = self.conv1(image.to(dtype))
        alpha_embed = self.conv1_alpha(prepare_alpha(alpha, self.conv1_alpha.weight.dtype))
        return x + alpha_embed.to(x.dtype)  # broadcasts one image over many alphas

    def tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """Patch grid ``[B, C, h, w]`` -> ``ln_pre`` tokens ``[B, 1 + h*w, C]`` with class token and positions."""
        B, C, h, w = grid.shape
        x = grid.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]
        cls = self.class_embedding.to(x.dtype).expand(B, 1, C)
        pos = resample_pos_embed(self.positional_embedding, (h, w)).to(x.dtype)
        return self.ln_pre(torch.cat([cls, x], dim=1) + pos)

    # --- timm feature interface --------------------------------------------------------------------
    def encode_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """Patch grid ``[B, C, h, w]`` -> tokens after every block, before ``ln_post``: ``[B, 1 + h*w, C]``."""
        x = self.tokens(grid)
        if self.window_size:
            return self.run_blocks(x, (grid.shape[-2], grid.shape[-1]))
        return self.transformer(x)

    def encode_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """Patch grid ``[B, C, h, w]`` (:meth:`patch_embed`) -> image embedding ``[B, embed_dim]``."""
        x = self.encode_tokens(grid)
        return self.ln_post(x[:, 0]) @ self.proj.to(x.dtype)  # ln_post on the class token only

    def forward_features(self, image: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Returns all tokens after ``ln_post``: ``[B, 1 + h*w, width]``."""
        return self.ln_post(self.encode_tokens(self.patch_embed(image, alpha)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Class token -> joint embedding ``[B, embed_dim]`` (or ``[B, width]`` with ``pre_logits``)."""
        x = x[:, 0]
        return x if pre_logits else x @ self.proj.to(x.dtype)

    def forward(self, image: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image embedding ``[B, embed_dim]`` (not normalised), as OpenAI CLIP's ``encode_image``."""
        return self.encode_grid(self.patch_embed(image, alpha))

    def forward_intermediates(
        self,
        image: torch.Tensor,
        alpha: Optional[torch.Tensor] = None,
        indices: Optional[Union[int, Sequence[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Per-block outputs, as timm's ``forward_intermediates``.

        Args:
            indices: the last n blocks (int) or block indices (negative allowed); None = all.
            return_prefix_tokens: also return each block's class token, as ``(patches, cls [B, 1, C])``.
            norm: apply ``ln_post`` to the intermediates.
            stop_early: stop after the last requested block.
            output_fmt: ``"NCHW"`` (``[B, C, h, w]``) or ``"NLC"`` (``[B, h*w, C]``).

        Returns:
            ``intermediates`` if ``intermediates_only`` else ``(final tokens [B, 1+h*w, C], intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        blocks = len(self.transformer.resblocks)
        take = _take_indices(blocks, indices)
        grid = self.patch_embed(image, alpha)
        B, _, h, w = grid.shape
        x = self.tokens(grid)
        out = []
        depth = take[-1] + 1 if (stop_early or intermediates_only) else blocks
        for i in range(depth):
            x = self.run_block(i, x, (h, w))
            if i in take:
                y = self.ln_post(x) if norm else x
                prefix, patches = y[:, :1], y[:, 1:]
                if output_fmt == "NCHW":
                    patches = patches.transpose(1, 2).reshape(B, -1, h, w)  # [B, h*w, C] -> [B, C, h, w]
                out.append((patches, prefix) if return_prefix_tokens else patches)
        if intermediates_only:
            return out
        return self.ln_post(x), out

    # --- windowed attention (ViTDet) -----------------------------------------------------------------
    def set_window_attention(self, window_size: int, global_blocks: Sequence[int] = ()) -> None:
        """Attend within ``window_size`` x ``window_size`` windows of patches, except in ``global_blocks``
        (ViTDet: 14 and ``(2, 5, 8, 11)`` for 12 blocks); 0 turns windows off. Parameters do not change.

        The class token attends globally and every window also sees it (:mod:`.window`), so a window that
        covers the whole grid equals global attention; grids that windows do not tile are padded and the
        padding is masked out.

        Raises:
            ValueError: a negative window size or a block index out of range.
        """
        blocks = len(self.transformer.resblocks)
        if not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"window_size must be a whole number >= 0 (0: global attention); got {window_size!r}")
        self.window_size = window_size
        self.global_blocks = tuple(_take_indices(blocks, list(global_blocks))) if window_size else ()

    def run_block(self, i: int, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Block ``i`` on tokens ``[B, 1 + h*w, C]`` of a ``grid`` ``(h, w)``: windowed unless global."""
        if self.window_size and i not in self.global_blocks:
            return self.transformer.run_window_block(i, x, grid, self.window_size)
        return self.transformer.run_block(i, x)

    def run_blocks(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """All blocks, as :meth:`run_block`."""
        for i in range(len(self.transformer.resblocks)):
            x = self.run_block(i, x, grid)
        return x

    # --- training helpers ------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def freeze(self, num_blocks: Optional[int] = None) -> None:
        """Stop gradients to the stem (patch embeddings, class token, positions, ``ln_pre``) and the first
        ``num_blocks`` blocks; None freezes the whole tower (frozen CLIP backbones, as in F-VLM)."""
        stem = [self.conv1, self.conv1_alpha, self.ln_pre]
        params = [p for m in stem for p in m.parameters()] + [self.class_embedding, self.positional_embedding]
        blocks = self.transformer.resblocks
        n = len(blocks) if num_blocks is None else num_blocks
        params += [p for b in blocks[:n] for p in b.parameters()]
        if num_blocks is None:
            params += list(self.ln_post.parameters()) + [self.proj]
            self.frozen = True
            self.eval()
        for p in params:
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "VisionTransformer":
        """As ``nn.Module.train``; a tower frozen whole stays in eval mode (a frozen CLIP backbone)."""
        return super().train(mode and not self.frozen)

    def freeze_head(self, norm: bool = True) -> None:
        """Stop gradients to the pooling head (``proj``, and ``ln_post`` with ``norm``), which a dense
        feature extractor (a detection backbone) never uses: every trainable weight then gets a gradient."""
        params = [self.proj] + (list(self.ln_post.parameters()) if norm else [])
        for p in params:
            p.requires_grad_(False)

    #: Parameters kept out of weight decay besides norms and biases (timm's ``no_weight_decay`` names).
    NO_WEIGHT_DECAY = ("class_embedding", "positional_embedding")

    def no_weight_decay(self) -> set:
        return set(self.NO_WEIGHT_DECAY)

    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        """Parameter groups for layer-wise lr decay (timm's convention)."""
        return dict(
            stem=r"^conv1|^conv1_alpha|^class_embedding|^positional_embedding|^ln_pre",
            blocks=r"^transformer\.resblocks\.(\d+)" if coarse else [(r"^transformer\.resblocks\.(\d+)", None),
                                                                     (r"^ln_post|^proj", (99999,))],
        )


def feature_tower(
    arch: str, frozen: bool = False, frozen_stages: int = -1, with_cp: bool = False, norm_out: bool = False,
    *, window_size: int = 0, global_blocks: Sequence[int] = (), **overrides: object,
) -> VisionTransformer:
    """A vision tower set up as a dense feature extractor (the detection backbones' common part).

    Args:
        arch: architecture name (``"ViT-B/16"``...); ``overrides`` are vision config fields.
        frozen: freeze the whole tower.
        frozen_stages: -1 none; 0 the stem; k the stem and the first k blocks.
        with_cp: gradient checkpointing of the blocks.
        norm_out: the outputs go through ``ln_post`` (so it keeps its gradients); the projection never
            does, so it is frozen: every trainable weight then gets a gradient.
        window_size, global_blocks: windowed attention outside ``global_blocks``
            (:meth:`VisionTransformer.set_window_attention`); 0 = global attention everywhere.
    """
    from .config import get_config

    tower = VisionTransformer(get_config(arch).replace(**{f"vision_{k}": v for k, v in overrides.items()}).vision)
    tower.set_grad_checkpointing(with_cp)
    tower.set_window_attention(window_size, global_blocks)
    tower.freeze_head(norm=not norm_out)
    if frozen:
        tower.freeze()
    elif frozen_stages >= 0:
        tower.freeze(frozen_stages)
    return tower
