"""AdamW with Alpha-CLIP's learning-rate groups, the warmup + cosine schedule, gradient clipping and autocast."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn

from .config import OptimConfig


def _tower(name: str) -> str:
    if "conv1_alpha" in name:
        return "alpha"
    return "vision" if name.startswith("visual.") else "text"


def param_groups(model: nn.Module, cfg: OptimConfig) -> List[Dict[str, object]]:
    """Trainable parameters in named groups: ``alpha``, ``vision`` and ``text``, each with and without decay.

    ``conv1_alpha`` trains at ``lr``, the rest of the vision tower at ``lr * lr_ratio`` and the text
    tower (and a trainable logit scale) at ``lr * text_lr_ratio``. Weight decay applies to weights of two
    or more dimensions, except those the model lists in ``no_weight_decay()`` (positional and class
    embeddings); norms, biases and the logit scale never decay.
    """
    ratio = {"alpha": 1.0, "vision": cfg.lr_ratio, "text": cfg.text_lr_ratio}
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: Dict[str, Dict[str, object]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = _tower(name)
        decay = p.ndim >= 2 and name not in skip
        key = tower if decay else f"{tower}_no_decay"
        if key not in groups:
            lr = cfg.lr * ratio[tower]
            groups[key] = {"name": key, "params": [], "lr": lr, "base_lr": lr,
                           "weight_decay": cfg.weight_decay if decay else 0.0}
        groups[key]["params"].append(p)  # type: ignore[union-attr]
    if not groups:
        raise ValueError("no parameter requires a gradient: nothing would train")
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    if len(cfg.betas) != 2:
        raise ValueError(f"optim.betas must hold two numbers; got {cfg.betas}")
    return torch.optim.AdamW(param_groups(model, cfg), betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rates at ``step`` (0-based): linear warmup, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Apply the schedule to every group; returns the ``alpha`` group's (or first group's) learning rate."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    first = next((g for g in optimizer.param_groups if g.get("name") == "alpha"), optimizer.param_groups[0])
    return float(first["lr"])


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device_type: str, precision: str):
    """The autocast context of a run's ``precision`` (disabled for fp32)."""
    dtype = DTYPES[precision] if precision != "fp32" else None
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def clip_grads(params: List[nn.Parameter], max_norm: Optional[float]) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` (None: only measure it); returns the norm before clipping."""
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
