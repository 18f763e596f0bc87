"""The alpha channel: how a region becomes the fourth input, and the checks that keep it honest.

Alpha-CLIP's reference pipeline turns a mask ``m`` in [0, 1] into ``(m - 0.5) / 0.26``: foreground
+1.9231, background -1.9231. "Whole image" is all foreground; zeros mean "half inside", not "no region".
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_tracing
except ImportError:  # torch < 2.5
    from torch.fx._symbolic_trace import is_fx_tracing as _fx_tracing

ALPHA_MEAN = 0.5
ALPHA_STD = 0.26
ALPHA_FOREGROUND = (1.0 - ALPHA_MEAN) / ALPHA_STD  # +1.9231
ALPHA_BACKGROUND = (0.0 - ALPHA_MEAN) / ALPHA_STD  # -1.9231

# OpenAI CLIP's image normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The same, with the alpha channel's statistics appended: for frameworks that normalise 4 channels.
RGBA_MEAN = CLIP_MEAN + (ALPHA_MEAN,)
RGBA_STD = CLIP_STD + (ALPHA_STD,)

_TOL = 1e-3  # slack for values that went through bf16/fp16


def encode_alpha(mask: torch.Tensor) -> torch.Tensor:
    """Encode a mask in [0, 1] (1 = region) as Alpha-CLIP's alpha values."""
    return (mask - ALPHA_MEAN) / ALPHA_STD


def mask_to_float(mask: Any, name: str = "mask") -> np.ndarray:
    """A mask as float32 in [0, 1], from bool, integers, float in [0, 1], PIL, numpy or torch.

    Integer masks are 0/1 (max 1), 8-bit (max 255: 255 is the region, values between are soft) or 16-bit
    (max 65535). Any other maximum (a label map such as 0/2) is refused: select the label first
    (``mask == label``). A PIL image with a varying alpha channel is read from that channel.

    Raises:
        ValueError: for NaN, floats outside [0, 1] (an unscaled 0-255 float mask is the classic bug),
            negative integers, label maps, or a colour PIL image.
    """
    if hasattr(mask, "getbands"):  # PIL
        from .images import pil_mask

        mask = pil_mask(mask, name)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return mask.astype(np.float32)
    if np.issubdtype(mask.dtype, np.integer):
        lo, hi = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
        if lo < 0 or hi not in (0, 1, 255, 65535):
            values = np.unique(mask)
            shown = ", ".join(str(v) for v in values[:6]) + (", ..." if values.size > 6 else "")
            raise ValueError(
                f"{name} has integer values {{{shown}}}; an integer mask is 0/1, 0-255 (255 = region) or 16-bit "
                f"0-65535. If it is a label map, select one label (mask == label); if it is a soft mask, scale it "
                f"to 255 or pass floats in [0, 1]"
            )
        return mask.astype(np.float32) / float(max(hi, 1))
    if not np.issubdtype(mask.dtype, np.floating):
        raise ValueError(f"{name} has dtype {mask.dtype}; expected bool, an integer type or float")
    mask = mask.astype(np.float32)
    if mask.size and np.isnan(mask).any():
        raise ValueError(f"{name} contains NaN")
    if mask.size and (mask.min() < 0.0 or mask.max() > 1.0):
        raise ValueError(
            f"float {name} has values in [{mask.min():g}, {mask.max():g}]; a float mask must lie in [0, 1] "
            f"(divide a 0-255 mask by 255, or pass it as uint8)"
        )
    return mask


def tracing() -> bool:
    """True while TorchScript, ``torch.jit.trace``, ``torch.fx`` or ``torch.compile`` captures a graph: Python
    checks on values or shapes are skipped then (the graph must not branch on data)."""
    return torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() or _fx_tracing()


def check_alpha_in_forward(enabled: bool = True) -> bool:
    """Opt in to checking alpha values on every forward of every tower (off by default).

    Values are checked where user data enters (``RegionProcessor``, the timm transforms, ``classify_regions``,
    the image processors); a forward does not check, since a check reads the tensor back (a device sync)
    and would keep ``torch.jit.script``/``torch.fx`` from capturing the model. Code that feeds hand-made
    alpha tensors to a model can turn the check on while debugging (or set ``ALPHACLIP_CHECK_ALPHA=1``).
    Graph capture (TorchScript, tracing, fx, compile) always skips it. Returns the previous setting.
    """
    global _CHECK_IN_FORWARD
    previous, _CHECK_IN_FORWARD = _CHECK_IN_FORWARD, bool(enabled)
    return previous


_CHECK_IN_FORWARD = os.environ.get("ALPHACLIP_CHECK_ALPHA", "").lower() in ("1", "true", "yes")


@torch.jit.unused
def check_alpha_if_enabled(alpha: torch.Tensor) -> None:
    """:func:`check_alpha`, when :func:`check_alpha_in_forward` turned it on (and no graph is being captured)."""
    if _CHECK_IN_FORWARD and not tracing():
        check_alpha(alpha)


def check_alpha(alpha: torch.Tensor) -> None:
    """Refuse alpha values that were not encoded: a raw [0, 1] mask, a 0-255 mask, all zeros, NaN.

    Encoded alpha lies in [-1.9231, +1.9231]; see :func:`encode_alpha`. Call it where alpha tensors enter
    (preprocessing, loaders); models do not check unless :func:`check_alpha_in_forward` is on.
    """
    if tracing():
        return
    lo, hi = torch.aminmax(alpha.detach())
    lo, hi = float(lo), float(hi)
    if lo != lo or hi != hi:
        raise ValueError("alpha contains NaN")
    if lo < ALPHA_BACKGROUND - _TOL or hi > ALPHA_FOREGROUND + _TOL:
        raise ValueError(
            f"alpha has values in [{lo:.4g}, {hi:.4g}] but encoded alpha lies in "
            f"[{ALPHA_BACKGROUND:.4f}, {ALPHA_FOREGROUND:.4f}]; encode a [0, 1] mask with "
            f"alphaclip_plugins.encode_alpha(mask) or use RegionProcessor"
        )
    if lo == hi == 0.0:
        raise ValueError(
            "alpha is all zeros, which Alpha-CLIP reads as 'half inside everywhere', not as the whole image; "
            "pass alpha=None (or a 3-channel input) for the whole image"
        )
    if lo >= 0.0 and hi <= 1.0:
        raise ValueError(
            f"alpha has values in [{lo:.4g}, {hi:.4g}]: this looks like a raw [0, 1] mask, not encoded alpha; "
            f"encode it with alphaclip_plugins.encode_alpha(mask) (foreground +1.9231, background -1.9231)"
        )
