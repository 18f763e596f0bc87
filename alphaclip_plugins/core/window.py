"""Windowed self-attention (ViTDet style) for the vision tower, with the class token kept global.

ViTDet has no class token; CLIP has one. Here, in a windowed block:

- every patch token attends to the tokens of its window **and the class token**;
- the class token attends to **all** tokens (one query, so this costs ``O(N)``, not ``O(N^2)``).

So a window that covers the whole grid is exactly the tower's global attention, and the class token stays
what CLIP's head expects. Grids that windows do not tile are padded at the bottom and right; padded tokens
are masked out as keys and dropped as queries, so they change nothing: an edge window behaves as a smaller
window. A window larger than the grid along a side shrinks to the grid there (no padding at all).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def window_shape(grid: Tuple[int, int], window: int) -> Tuple[int, int]:
    """The window ``(wh, ww)`` used on a ``grid`` of ``(h, w)`` tokens: ``window`` per side, at most the grid."""
    return min(window, grid[0]), min(window, grid[1])


def partition(t: torch.Tensor, grid: Tuple[int, int], win: Tuple[int, int]) -> torch.Tensor:
    """Patch tokens ``[B, heads, h*w, d]`` -> windows ``[B*nW, heads, wh*ww, d]``, zero-padded at bottom/right."""
    B, heads, _, d = t.shape
    (h, w), (wh, ww) = grid, win
    ph, pw = (-h) % wh, (-w) % ww
    t = t.reshape(B, heads, h, w, d)
    if ph or pw:
        t = F.pad(t, (0, 0, 0, pw, 0, ph))
    nh, nw = (h + ph) // wh, (w + pw) // ww
    # [B, heads, nh*wh, nw*ww, d] -> [B, nh, nw, heads, wh, ww, d]
    t = t.reshape(B, heads, nh, wh, nw, ww, d).permute(0, 2, 4, 1, 3, 5, 6)
    return t.reshape(B * nh * nw, heads, wh * ww, d)


def unpartition(t: torch.Tensor, batch: int, grid: Tuple[int, int], win: Tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`partition`: ``[B*nW, heads, wh*ww, d]`` -> ``[B, heads, h*w, d]``, padding cropped."""
    (h, w), (wh, ww) = grid, win
    nh, nw = -(-h // wh), -(-w // ww)
    heads, d = t.shape[1], t.shape[-1]
    # [B*nW, heads, wh*ww, d] -> [B, heads, nh, wh, nw, ww, d]
    t = t.reshape(batch, nh, nw, heads, wh, ww, d).permute(0, 3, 1, 4, 2, 5, 6)
    t = t.reshape(batch, heads, nh * wh, nw * ww, d)[:, :, :h, :w]
    return t.reshape(batch, heads, h * w, d)


def key_mask(grid: Tuple[int, int], win: Tuple[int, int], batch: int, device: torch.device) -> Optional[torch.Tensor]:
    """Boolean attention mask ``[B*nW, 1, 1, 1 + wh*ww]`` (True = attend): the class token and real patches;
    None when the windows tile the grid (no padding)."""
    (h, w), (wh, ww) = grid, win
    if h % wh == 0 and w % ww == 0:
        return None
    real = torch.ones(1, 1, h * w, 1, dtype=torch.bool, device=device)
    real = partition(real, grid, win)[:, 0, :, 0]  # [nW, wh*ww]; padding comes out False
    real = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)  # the class token is always a key
    return real.repeat(batch, 1)[:, None, None, :]


def window_attention(attn: nn.Module, x: torch.Tensor, grid: Tuple[int, int], window: int) -> torch.Tensor:
    """Windowed multi-head self-attention with ``attn``'s weights (an ``Attention``: ``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``, ``heads``).

    Args:
        x: tokens ``[B, 1 + h*w, C]``, class token first, patches row-major.
        grid: ``(h, w)``, the patch grid.
        window: side of the square windows, in tokens.

    Returns:
        ``[B, 1 + h*w, C]``, as ``attn(x)`` would return with the attention restricted to windows.
    """
    B, N, C = x.shape
    heads = attn.heads
    win = window_shape(grid, window)
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    # [B, N, 3C] -> 3 x [B, heads, N, C/heads]
    q, k, v = qkv.view(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
    cls = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # the class token sees everything
    qw, kw, vw = (partition(t[:, :, 1:], grid, win) for t in (q, k, v))
    n_win = qw.shape[0] // B
    # Each window's keys and values: the class token first, then the window's patches.
    kw = torch.cat([k[:, :, :1].repeat_interleave(n_win, dim=0), kw], dim=2)
    vw = torch.cat([v[:, :, :1].repeat_interleave(n_win, dim=0), vw], dim=2)
    mask = key_mask(grid, win, B, x.device)
    patches = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask)
    out = torch.cat([cls, unpartition(patches, B, grid, win)], dim=2)
    # [B, heads, N, C/heads] -> [B, N, C]
    return attn.out_proj(out.transpose(1, 2).reshape(B, N, C))
