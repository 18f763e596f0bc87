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


# --- any patch size: stride-16 maps and pyramids ---------------------------------------------------------
TINY14 = dict(arch="tiny", patch_size=14, image_size=28)  # a tiny patch-14 tower (ViT-L/14's geometry)


def _sampled_at_stride_16(core_map: torch.Tensor, out_hw) -> torch.Tensor:
    """Reference resampling: cell j of the stride-16 grid (centre 16 j + 8 px) read bilinearly from the
    stride-14 map at pixel (16 j + 8), i.e. grid_sample at normalised (16 j + 8) / (14 w) * 2 - 1."""
    h14, w14 = core_map.shape[-2:]
    ys = (16 * torch.arange(out_hw[0]) + 8) / (14 * h14) * 2 - 1
    xs = (16 * torch.arange(out_hw[1]) + 8) / (14 * w14) * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None].expand(core_map.shape[0], -1, -1, -1)
    return torch.nn.functional.grid_sample(core_map, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_patch14_tower_gives_exact_stride16_maps():
    from alphaclip_plugins.detection.features import default_stride, dense_features

    assert [default_stride(p) for p in (8, 14, 16, 32)] == [8, 16, 16, 32]
    torch.manual_seed(0)
    tower = feature_tower(**TINY14, layers=3, window_size=2, global_blocks=(1,))
    random_alpha_conv_(tower)
    x = torch.cat([torch.randn(2, 3, 96, 160), random_alpha(2, 160)[..., :96, :]], dim=1)
    with torch.no_grad():
        (feat,) = dense_features(tower.eval(), x, [-1])
        padded = torch.nn.functional.pad(x, (0, 8, 0, 2))  # 98 x 168: whole patches of 14
        (core,) = tower.forward_intermediates(padded, indices=[-1], intermediates_only=True)
    assert core.shape[-2:] == (7, 12) and feat.shape == (2, 64, 96 // 16, 160 // 16)
    assert (feat - _sampled_at_stride_16(core, (6, 10))).abs().max() < 1e-5
    patch16 = feature_tower("tiny", patch_size=16, image_size=32).eval()
    with torch.no_grad():  # power-of-two patches: the tower's own grid, untouched
        assert torch.equal(dense_features(patch16, x, [0])[0],
                           patch16.forward_intermediates(x, indices=[0], intermediates_only=True)[0])


@needs_mmdet
def test_patch14_pyramid_in_mmdet_has_checked_strides_and_shapes():
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    import alphaclip_plugins.integrations.mmdet  # noqa: F401

    init_default_scope("mmdet")
    backbone = MODELS.build(dict(type="AlphaCLIPViT", **TINY14, window_size=2, global_blocks=(1,)))
    neck = MODELS.build(dict(type="SimpleFeaturePyramid", in_channels=64, out_channels=32, num_outs=5,
                             in_stride=backbone.out_stride))
    H, W = 128, 192
    with torch.no_grad():
        levels = neck(backbone(torch.randn(1, 4, H, W)))
    print("mmdet patch-14 pyramid:", [(s, tuple(f.shape)) for s, f in zip(neck.strides, levels)])
    assert backbone.out_stride == 16 and neck.strides == [4, 8, 16, 32, 64]
    assert [tuple(f.shape[-2:]) for f in levels] == [(H // s, W // s) for s in neck.strides]
    with pytest.raises(ValueError, match="log2-contiguous powers of two"):
        MODELS.build(dict(type="SimpleFeaturePyramid", in_channels=64, in_stride=14))


def _lazy(name: str = "mask_rcnn_alphaclip_vit_b16_vitdet_lsj_100ep.py", **net):
    from pathlib import Path

    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(str(Path(__file__).resolve().parent.parent / "configs" / "detectron2" / name))
    cfg.model.backbone.net.update(window_size=2, global_blocks=(1,), with_cp=False, **net)
    cfg.model.backbone.square_pad = 0
    cfg.model.backbone.out_channels = 32
    cfg.model.roi_heads.num_classes = 3
    cfg.model.roi_heads.box_head.conv_dims = [32]
    cfg.model.roi_heads.box_head.fc_dims = [64]
    cfg.model.roi_heads.mask_head.conv_dims = [32]
    cfg.model.proposal_generator.post_nms_topk = (50, 50)
    cfg.model.roi_heads.batch_size_per_image = 32
    return cfg


@needs_d2
@pytest.mark.parametrize("net,levels", [(TINY14, ["p2", "p3", "p4", "p5", "p6"]),
                                        (dict(arch="tiny", out_stride=8), ["p1", "p2", "p3", "p4", "p5"])])
def test_pyramid_in_detectron2_has_checked_strides_and_derived_in_features(net, levels):
    from detectron2.config import instantiate

    from alphaclip_plugins.integrations.detectron2 import AlphaCLIPViTBackbone

    model = instantiate(_lazy(**net).model)
    shapes = model.backbone.output_shape()
    H, W = 128, 192
    with torch.no_grad():
        out = model.backbone(torch.randn(1, 4, H, W))
    print("detectron2 pyramid:", {k: (shapes[k].stride, tuple(v.shape)) for k, v in out.items()})
    assert list(out) == levels and model.proposal_generator.in_features == levels
    assert model.roi_heads.box_in_features == model.roi_heads.mask_in_features == levels[:-1]
    assert model.backbone.top_block.in_feature == levels[-2]
    assert all(tuple(v.shape[-2:]) == (H // shapes[k].stride, W // shapes[k].stride) for k, v in out.items())
    assert [p.spatial_scale for p in model.roi_heads.box_pooler.level_poolers] == [
        1 / shapes[k].stride for k in levels[:-1]]
    with pytest.raises(ValueError, match="out_stride must be a power of two"):
        AlphaCLIPViTBackbone(**TINY14, out_stride=14)  # what detectron2's pyramid would refuse
