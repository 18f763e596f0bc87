"""The residual attention transformer shared by both towers, with OpenAI CLIP's parameter names.

Names follow OpenAI CLIP (``attn.in_proj_weight``, ``mlp.c_fc``, ``ln_1`` ...) so that released
state dicts load strictly. Attention runs through ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .window import window_attention


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so fp16/bf16 models stay stable (as in OpenAI CLIP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation OpenAI CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        return torch.sigmoid(1.702 * x).mul_(x)  # inference: one temporary fewer


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; expected 'quick_gelu' or 'gelu'")


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names (q, k, v stacked)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # [B, N, 3C] -> [3, B, heads, N, C/heads]
        q, k, v = qkv.view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        # [B, heads, N, C/heads] -> [B, N, C]
        return self.out_proj(x.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = make_activation(act)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, ln_eps: float = 1e-5):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))

    def forward_windowed(self, x: torch.Tensor, grid: Tuple[int, int], window: int) -> torch.Tensor:
        """As :meth:`forward` on vision tokens ``[B, 1 + h*w, C]``, attention in windows (:mod:`.window`)."""
        x = x + window_attention(self.attn, self.ln_1(x), grid, window)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks on ``[B, N, C]`` tokens (batch first)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, act: str, ln_eps: float = 1e-5):
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_dim, act, ln_eps) for _ in range(layers)]
        )

    def run_block(self, i: int, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        block: Callable[..., torch.Tensor] = self.resblocks[i]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, is_causal, use_reentrant=False)
        return block(x, is_causal)

    def run_window_block(self, i: int, x: torch.Tensor, grid: Tuple[int, int], window: int) -> torch.Tensor:
        """Block ``i`` with windowed attention on a ``grid`` of patch tokens (class token first)."""
        block = self.resblocks[i]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block.forward_windowed, x, grid, window, use_reentrant=False)
        return block.forward_windowed(x, grid, window)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        for i in range(len(self.resblocks)):
            x = self.run_block(i, x, is_causal)
        return x


def init_transformer_(transformer: Transformer) -> None:
    """OpenAI CLIP's initialisation of a block stack."""
    width, layers = transformer.width, len(transformer.resblocks)
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    attn_std = width**-0.5
    fc_std = (2 * width) ** -0.5
    for block in transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
