"""ViTDet-grade backbones: windowed attention in the core tower, layer-wise lr decay, any patch size, and the
ViTDet-style configs of MMDetection and Detectron2 run for a few iterations."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from alphaclip_plugins.core.vision import VisionTransformer, feature_tower
from alphaclip_plugins import create_model
from alphaclip_plugins.core.checkpoint import save_official
from conftest import random_alpha, random_alpha_conv_

ROOT = Path(__file__).resolve().parent.parent

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
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(str(ROOT / "configs" / "detectron2" / name))
    cfg.model.backbone.net.update(window_size=2, global_blocks=(1,), with_cp=False, **net)
    cfg.model.backbone.square_pad = 0
    cfg.model.roi_heads.num_classes = 3
    cfg.model.roi_heads.box_head.conv_dims = [32]
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


# --- layer-wise lr decay and weight-decay groups -----------------------------------------------------------
def _expected_layer(rel: str, num_layers: int) -> int:
    """Independent statement of the rule: stem 0, block n -> n + 1, the rest num_layers + 1."""
    if rel.split(".")[0] in ("conv1", "conv1_alpha", "class_embedding", "positional_embedding", "ln_pre"):
        return 0
    if rel.startswith("transformer.resblocks."):
        return int(rel.split(".")[2]) + 1
    return num_layers + 1


def _check_groups(model, per_param: dict, prefix: str, base_lr: float, wd: float, rate: float, layers: int):
    """``per_param``: name -> (lr, weight_decay). Prints the table and checks every trainable parameter."""
    print(f"\n{'parameter':<66} {'lr':>10} {'wd':>5}")
    for name, p in model.named_parameters():
        if name not in per_param:
            assert not p.requires_grad, f"trainable {name} is in no group"
            continue
        lr, decay = per_param[name]
        if name.startswith(prefix):
            print(f"{name:<66} {lr:>10.3e} {decay:>5}")
        rel = name[len(prefix):] if name.startswith(prefix) else ""
        want_lr = base_lr * rate ** (layers + 1 - (_expected_layer(rel, layers) if rel else layers + 1))
        assert lr == pytest.approx(want_lr, rel=1e-9), name
        exempt = p.ndim == 1 or rel in ("class_embedding", "positional_embedding")
        if rel or isinstance(model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.LayerNorm):
            assert decay == (0.0 if exempt else wd), name
    lrs = {round(per_param[n][0] / base_lr, 9) for n in per_param if n.startswith(prefix)}
    assert len(lrs) == layers + 1  # stem + one per block (ln_post / proj are frozen)


@needs_mmdet
def test_mmdet_layer_decay_constructor_groups():
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    import alphaclip_plugins.integrations.mmdet  # noqa: F401
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    cfg = _mmdet_tiny_cfg()
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    per_param = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in wrapper.optimizer.param_groups:
        for p in g["params"]:
            assert names[id(p)] not in per_param
            per_param[names[id(p)]] = (g["lr"], g["weight_decay"])
    _check_groups(model, per_param, "backbone.visual.", 1e-4, 0.1, 0.7, 3)
    assert per_param["backbone.visual.conv1_alpha.weight"][0] == pytest.approx(1e-4 * 0.7 ** 4)
    assert per_param["backbone.visual.transformer.resblocks.2.mlp.c_fc.weight"][0] == pytest.approx(1e-4 * 0.7)
    assert per_param["neck.stages.0.1.weight"] == (pytest.approx(1e-4), 0.1)  # necks and heads: full lr


@needs_d2
def test_detectron2_layer_decay_groups_through_get_default_optimizer_params():
    from detectron2.config import instantiate
    from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

    from alphaclip_plugins.integrations.detectron2 import get_alphaclip_vit_lr_decay_rate

    cfg = _lazy(**TINY14, layers=3)
    cfg.optimizer.params.lr_factor_func = partial(get_alphaclip_vit_lr_decay_rate, lr_decay_rate=0.7, num_layers=3)
    model = instantiate(cfg.model)
    names = [n for n, p in model.named_parameters() if n.startswith("backbone.net.visual.") and p.requires_grad]
    assert {get_vit_lr_decay_rate(n, 0.7, 3) for n in names} == {1.0}  # why detectron2's own does not do
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    per_param = {}
    ids = {id(p): n for n, p in model.named_parameters()}
    for g in optimizer.param_groups:
        for p in g["params"]:
            per_param[ids[id(p)]] = (g["lr"], g["weight_decay"])
    _check_groups(model, per_param, "backbone.net.visual.", 1e-4, 0.1, 0.7, 3)



# --- the ViTDet configs, trained for a few iterations on a tiny synthetic COCO set --------------------------
from coco_files import CLASSES, synthetic_coco  # noqa: E402  (one writer of the tiny COCO set)


def _tiny14_checkpoint(path: Path) -> Path:
    """An official-layout (``.pth``) vision tower of the tiny patch-14 variant with 3 blocks."""
    model = create_model("tiny", vision_patch_size=14, vision_image_size=28, vision_layers=3, seed=3)
    random_alpha_conv_(model)
    save_official(model, path)
    return path


def _mmdet_tiny_cfg(data: Path = None, ckpt: Path = None, size: int = 128):
    """The mmdet ViTDet config shrunk to the tiny patch-14 tower, 128 px jitter and a synthetic set."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(ROOT / "configs" / "mmdet" / "mask-rcnn_alphaclip-vit-b16_vitdet-lsj-100e_coco.py"))
    init = dict(type="Pretrained", checkpoint=str(ckpt)) if ckpt else None
    cfg.model.backbone.update(**TINY14, layers=3, window_size=2, global_blocks=(1,), init_cfg=init)
    cfg.model.data_preprocessor.batch_augments[0].size = (size, size)
    cfg.model.neck.update(in_channels=64, out_channels=32)
    cfg.model.rpn_head.update(in_channels=32, feat_channels=32)
    roi = cfg.model.roi_head
    roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = 32
    roi.bbox_head.update(in_channels=32, fc_out_channels=64, num_classes=len(CLASSES))
    roi.mask_head.update(in_channels=32, conv_out_channels=32, num_classes=len(CLASSES))
    cfg.paramwise = None
    cfg.optim_wrapper.type = "OptimWrapper"  # AMP needs a GPU
    cfg.optim_wrapper.paramwise_cfg.num_layers = 3
    pipeline = cfg.train_dataloader.dataset.dataset.pipeline
    pipeline[3].scale = pipeline[4].crop_size = (size, size)
    if data is not None:
        cfg.train_dataloader.update(batch_size=2, num_workers=0, persistent_workers=False)
        cfg.train_dataloader.dataset.dataset.update(
            data_root=str(data.parent), ann_file=data.name, data_prefix=dict(img="img/"),
            metainfo=dict(classes=CLASSES), filter_cfg=dict(filter_empty_gt=True, min_size=8))
    return cfg


@needs_mmdet
def test_mmdet_vitdet_config_trains_with_mmdets_own_train_script(tmp_path):
    import mmdet

    train_py = Path(mmdet.__file__).parent / ".mim" / "tools" / "train.py"
    cfg = _mmdet_tiny_cfg(synthetic_coco(tmp_path / "coco"), _tiny14_checkpoint(tmp_path / "tiny14.pth"))
    cfg.train_cfg.update(max_iters=3, val_interval=1000)
    for key in ("val_dataloader", "val_cfg", "val_evaluator", "test_dataloader", "test_cfg", "test_evaluator"):
        cfg[key] = None
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = 3
    cfg.dump(str(tmp_path / "vitdet_tiny.py"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(train_py), str(tmp_path / "vitdet_tiny.py"), "--work-dir",
                          str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (scalars,) = (tmp_path / "work").glob("*/vis_data/scalars.json")
    logs = [json.loads(line) for line in scalars.read_text().splitlines()]
    print("\n".join(f"iter {r['iter']}: loss {r['loss']:.4f} lr {r['lr']:.3e}" for r in logs if "loss" in r))
    assert [r["iter"] for r in logs if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in logs if "loss" in r)
    assert "layer-wise lr decay groups: layer_0_" in run.stdout + run.stderr
    # mmengine logs the first group's lr: the stem's, 0.7 ** 4 of the base, at the warmup's start (x 0.001).
    assert logs[0]["lr"] == pytest.approx(1e-4 * 0.7 ** 4 * 0.001, rel=1e-3)
    assert (tmp_path / "work" / "iter_3.pth").exists()


@needs_d2
def test_detectron2_vitdet_lazyconfig_trains_through_detectron2_engine(tmp_path):
    from detectron2.config import instantiate
    from detectron2.data.datasets import register_coco_instances
    from detectron2.engine import SimpleTrainer, hooks
    from detectron2.engine.defaults import default_writers

    from alphaclip_plugins.integrations.detectron2 import AlphaCLIPCheckpointer, get_alphaclip_vit_lr_decay_rate

    name = f"alphaclip_vitdet_synthetic_{os.getpid()}"
    register_coco_instances(name, {}, str(synthetic_coco(tmp_path / "coco")), str(tmp_path / "coco" / "img"))
    cfg = _lazy(**TINY14, layers=3)
    cfg.optimizer.params.lr_factor_func = partial(get_alphaclip_vit_lr_decay_rate, lr_decay_rate=0.7, num_layers=3)
    cfg.dataloader.train.dataset.names = name
    cfg.dataloader.train.total_batch_size, cfg.dataloader.train.num_workers = 2, 0
    resize, crop = cfg.dataloader.train.mapper.augmentations[1:]
    resize.target_height = resize.target_width = 128
    crop.crop_size = (128, 128)
    cfg.model.backbone.square_pad = 128
    cfg.train.update(output_dir=str(tmp_path / "out"), device="cpu", max_iter=3,
                     init_checkpoint=str(_tiny14_checkpoint(tmp_path / "tiny14.pth")))
    cfg.train.amp.enabled = False
    cfg.train.checkpointer.period = 3

    # What detectron2's tools/lazyconfig_train_net.py does, through its engine.
    model = instantiate(cfg.model).to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    trainer = SimpleTrainer(model, instantiate(cfg.dataloader.train), optimizer)
    checkpointer = AlphaCLIPCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=1),
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=False)
    loaded = torch.load(str(tmp_path / "tiny14.pth"), weights_only=True)["conv1_alpha.weight"]
    trainer.train(0, cfg.train.max_iter)
    logs = [json.loads(line) for line in (tmp_path / "out" / "metrics.json").read_text().splitlines()]
    print("\n".join(f"iter {r['iteration']}: loss {r['total_loss']:.4f}" for r in logs))
    assert [r["iteration"] for r in logs] == [0, 1, 2] and all(math.isfinite(r["total_loss"]) for r in logs)
    trained = model.backbone.net.visual.conv1_alpha.weight
    assert not torch.equal(trained, loaded) and (trained - loaded).abs().max() < 0.05  # loaded, then trained
    assert (tmp_path / "out" / "model_final.pth").exists()


@needs_d2
def test_yacs_pyramid_levels_are_checked_against_rpn_and_roi_in_features():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from alphaclip_plugins.integrations.detectron2 import add_alphaclip_config

    cfg = add_alphaclip_config(get_cfg())
    cfg.merge_from_file(str(ROOT / "configs" / "detectron2" / "faster_rcnn_alphaclip_vit_b16_sfp.yaml"))
    cfg.MODEL.ALPHACLIP.update(ARCH="tiny", WINDOW_SIZE=2, GLOBAL_BLOCKS=[1])  # patch 8: levels p1..p5
    with pytest.raises(ValueError, match=r"name \['p6'\], but the pyramid of tiny \(stride 8\) has \['p1'"):
        build_backbone(cfg)
    cfg.MODEL.ALPHACLIP.OUT_STRIDE = 16  # the config's p2..p6, from a stride-16 map
    backbone = build_backbone(cfg)
    assert {k: v.stride for k, v in backbone.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert backbone.net.visual.window_size == 2 and backbone.net.visual.global_blocks == (1,)
