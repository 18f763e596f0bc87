"""ViTDet-grade backbones: windowed attention in the core tower, layer-wise lr decay, any patch size, and the
ViTDet-style configs of MMDetection and Detectron2 run for a few iterations."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from alphaclip_plugins.core.vision import VisionTransformer, feature_tower
from conftest import random_alpha, random_alpha_conv_

HAVE_D2 = importlib.util.find_spec("detectron2") is not None
HAVE_MMDET = importlib.util.find_spec("mmdet") is not None and importlib.util.find_spec("mmcv") is not None
needs_d2 = pytest.mark.skipif(not HAVE_D2, reason="detectron2 is not installed (it is not on PyPI)")
needs_mmdet = pytest.mark.skipif(not HAVE_MMDET, reason="mmdet / mmcv are not installed")


def _tower(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    tower = feature_tower("tiny", layers=3, **kw)
    random_alpha_conv_(tower, seed)
    return tower.eval()


def _naive_windowed(tower: VisionTransformer, x: torch.Tensor, grid, window: int, global_blocks) -> torch.Tensor:
    """Reference: every window cut out (edge windows smaller, no padding) and run through the block's own
    global attention together with the class token; the class token attends to all tokens."""
    h, w = grid
    for i, block in enumerate(tower.transformer.resblocks):
        if i in global_blocks:
            x = block(x)
            continue
        y = block.ln_1(x)
        out = torch.empty_like(y)
        out[:, :1] = block.attn(y)[:, :1]
        for r in range(0, h, window):
            for c in range(0, w, window):
                rows = torch.arange(r, min(r + window, h))
                cols = torch.arange(c, min(c + window, w))
                idx = 1 + (rows[:, None] * w + cols[None, :]).flatten()
                out[:, idx] = block.attn(torch.cat([y[:, :1], y[:, idx]], dim=1))[:, 1:]
        x = x + out
        x = x + block.mlp(block.ln_2(x))
    return x


@pytest.mark.parametrize("size,window", [((40, 56), 2), ((40, 56), 3), ((48, 24), 4)])
def test_windows_match_a_naive_reference_and_padding_changes_nothing(size, window):
    tower = _tower()
    tower.set_window_attention(window, global_blocks=(1,))
    x, a = torch.randn(2, 3, *size), random_alpha(2, max(size))[..., : size[0], : size[1]]
    grid = (size[0] // 8, size[1] // 8)  # (5, 7), (5, 7), (6, 3): windows 3 and 4 need padding
    with torch.no_grad():
        got, inter = tower.forward_intermediates(x, a, indices=[0, 1, 2], output_fmt="NLC")
        ref = _naive_windowed(tower, tower.tokens(tower.patch_embed(x, a)), grid, window, (1,))
        assert (got - tower.ln_post(ref)).abs().max() < 1e-5
        assert (tower.forward_features(x, a) - got).abs().max() < 1e-5
        assert (tower(x, a) - tower.forward_head(got)).abs().max() < 1e-5
        tower.set_window_attention(0)
        glob = tower.forward_features(x, a)
    assert (got - glob).abs().max() > 1e-3  # windows really restrict attention


def test_window_covering_the_grid_equals_the_core_and_default_is_untouched():
    tower = _tower()
    x, a = torch.randn(2, 3, 40, 56), random_alpha(2, 56)[..., :40, :]
    with torch.no_grad():
        core = tower.forward_intermediates(x, a, indices=[0, 1, 2], output_fmt="NCHW")
        feats, emb = tower.forward_features(x, a), tower(x, a)
        for window in (7, 100):  # exactly the longer side, and larger than the grid
            tower.set_window_attention(window, global_blocks=())
            win = tower.forward_intermediates(x, a, indices=[0, 1, 2], output_fmt="NCHW")
            assert (win[0] - core[0]).abs().max() < 1e-5
            assert all((p - q).abs().max() < 1e-5 for p, q in zip(win[1], core[1]))
            assert (tower(x, a) - emb).abs().max() < 1e-5
        tower.set_window_attention(0)
        assert torch.equal(tower.forward_features(x, a), feats) and torch.equal(tower(x, a), emb)
    assert [n for n, _ in tower.named_parameters()] == [n for n, _ in _tower().named_parameters()]


def test_windowed_gradient_checkpointing_gives_the_same_output_and_gradients():
    x, a = torch.randn(2, 3, 40, 56), random_alpha(2, 56)[..., :40, :]
    results = []
    for with_cp in (False, True):
        tower = _tower(window_size=3, global_blocks=(-1,), with_cp=with_cp).train()
        (feat,) = tower.forward_intermediates(x, a, indices=[-1], intermediates_only=True)
        (feat * torch.linspace(-1, 1, feat.numel()).view_as(feat)).sum().backward()
        grads = {n: p.grad.clone() for n, p in tower.named_parameters() if p.requires_grad}
        results.append((feat.detach(), grads))
    (f0, g0), (f1, g1) = results
    assert tower.transformer.grad_checkpointing and tower.global_blocks == (2,)
    assert (f0 - f1).abs().max() < 1e-6 and g0.keys() == g1.keys()
    assert all((g0[n] - g1[n]).abs().max() < 1e-6 for n in g0)
    assert all(g0[n].abs().sum() > 0 for n in g0), [n for n in g0 if not g0[n].abs().sum()]


def test_window_options_are_checked():
    tower = _tower()
    with pytest.raises(ValueError, match="window_size must be"):
        tower.set_window_attention(-2)
    with pytest.raises(ValueError, match="out of range"):
        tower.set_window_attention(4, global_blocks=(3,))
