"""Pad-to-square and resize without building the padded full-resolution square.

``F.interpolate(F.pad(t), (S, S), antialias=True)`` on a 30000x1 image first allocates a 30000x30000 float
square (10.8 GB for RGB). Anti-aliased resizing is separable (PyTorch resizes the width, then the height, and
skips an axis whose size does not change), and each row (column) of one pass is independent of the others,
so :func:`pad_resize` pads and resizes one axis at a time, in chunks of rows (columns) that bound memory.
The result is bit-identical to the pad-then-resize it replaces.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK_ELEMENTS = 1 << 22  # ~16 MB of float32 per padded chunk


def _pad_resize_axis(t: torch.Tensor, dim: int, size: int, before: int, after: int, mode: str) -> torch.Tensor:
    """``t [C, H, W]``: zero-pad axis ``dim`` (-1 width, -2 height) by ``before``/``after``, resize it to ``size``."""
    other = -2 if dim == -1 else -1
    length = t.shape[dim] + before + after
    step = max(1, _CHUNK_ELEMENTS // max(1, length * t.shape[0]))
    out = []
    for start in range(0, t.shape[other], step):
        chunk = t.narrow(other, start, min(step, t.shape[other] - start))
        chunk = F.pad(chunk, (before, after) if dim == -1 else (0, 0, before, after))
        target = (chunk.shape[-2], size) if dim == -1 else (size, chunk.shape[-1])
        out.append(F.interpolate(chunk[None], size=target, mode=mode, antialias=True, align_corners=False)[0])
    return torch.cat(out, dim=other)


def pad_resize(t: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """``t [C, H, W]`` zero-padded to a centred square, resized to ``[C, size, size]`` (anti-aliased)."""
    H, W = t.shape[-2:]
    s = max(H, W)
    top, left = (s - H) // 2, (s - W) // 2
    t = _pad_resize_axis(t, -1, size, left, s - W - left, mode)  # [C, H, W] -> [C, H, size]
    return _pad_resize_axis(t, -2, size, top, s - H - top, mode)  # -> [C, size, size]
