"""Detectron2: backbone equals the core, configs build/train/predict, checkpoints, open vocabulary.

Skipped when detectron2 is not installed (it is not on PyPI); the import error itself is tested.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alphaclip_plugins import create_model
from alphaclip_plugins.core.alpha import ALPHA_MEAN, ALPHA_STD, CLIP_MEAN, CLIP_STD
from alphaclip_plugins.core.checkpoint import save_official
from conftest import random_alpha, random_alpha_conv_

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "detectron2"
HAVE_D2 = importlib.util.find_spec("detectron2") is not None
needs_d2 = pytest.mark.skipif(not HAVE_D2, reason="detectron2 is not installed (it is not on PyPI)")


def test_import_without_detectron2_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # make `import detectron2` fail
    monkeypatch.delitem(sys.modules, "alphaclip_plugins.integrations.detectron2", raising=False)
    with pytest.raises(ImportError, match="detectron2 is not on PyPI: install it from its source"):
        importlib.import_module("alphaclip_plugins.integrations.detectron2")


def _yacs(name: str):
    from detectron2.config import get_cfg

    from alphaclip_plugins.integrations.detectron2 import add_alphaclip_config

    cfg = add_alphaclip_config(get_cfg())
    cfg.merge_from_file(str(CONFIGS / name))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ALPHACLIP.ARCH = "tiny"
    cfg.MODEL.ALPHACLIP.SFP_OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    # The tiny tower has patch 8, so the pyramid's levels are p1..p5 rather than ViT-B/16's p2..p6.
    cfg.MODEL.RPN.IN_FEATURES = TINY_LEVELS
    cfg.MODEL.ROI_HEADS.IN_FEATURES = TINY_LEVELS[:-1]
    return cfg


TINY_LEVELS = ["p1", "p2", "p3", "p4", "p5"]


def _inputs(channels: int, with_masks: bool = False):
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(0)
    out = []
    for h, w in ((64, 96), (80, 64)):
        img = torch.randint(0, 256, (channels, h, w), generator=g, dtype=torch.uint8)
        inst = Instances((h, w), gt_boxes=Boxes(torch.tensor([[10.0, 10.0, 40.0, 40.0], [30.0, 20.0, 60.0, 60.0]])),
                         gt_classes=torch.tensor([1, 3]))
        if with_masks:
            m = torch.zeros(2, h, w, dtype=torch.bool)
            m[0, 10:40, 10:40] = m[1, 20:60, 30:60] = True
            inst.gt_masks = BitMasks(m)
        out.append(dict(image=img, height=h, width=w, instances=inst))
    return out


def _train_step_and_predict(model, with_masks: bool = False) -> None:
    from detectron2.utils.events import EventStorage

    model.train()
    with EventStorage():
        losses = model(_inputs(4, with_masks))
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    model.eval()
    for channels in (4, 3):
        with torch.no_grad():
            out = model(_inputs(channels, with_masks))
        assert len(out) == 2 and out[0]["instances"].has("pred_boxes")


@needs_d2
def test_yacs_faster_rcnn_builds_trains_and_predicts():
    from detectron2.modeling import build_model

    cfg = _yacs("faster_rcnn_alphaclip_vit_b16_sfp.yaml")
    assert list(cfg.MODEL.PIXEL_MEAN) == pytest.approx([255 * m for m in CLIP_MEAN] + [255 * ALPHA_MEAN], abs=1e-3)
    assert list(cfg.MODEL.PIXEL_STD) == pytest.approx([255 * s for s in CLIP_STD] + [255 * ALPHA_STD], abs=1e-3)
    _train_step_and_predict(build_model(cfg))


@needs_d2
def test_lazy_mask_rcnn_builds_trains_and_predicts():
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(CONFIGS / "mask_rcnn_alphaclip_vit_b16_sfp_lazy.py"))
    cfg.model.backbone.net.update(arch="tiny", out_stride=8)  # the tiny tower's own stride: levels p1..p5
    cfg.model.backbone.square_pad = 0
    cfg.model.roi_heads.num_classes = 5
    cfg.model.proposal_generator.post_nms_topk = (50, 50)
    cfg.model.roi_heads.batch_size_per_image = 32
    model = instantiate(cfg.model)
    assert model.proposal_generator.in_features == TINY_LEVELS and model.backbone.top_block.in_feature == "p4"
    assert [p.spatial_scale for p in model.roi_heads.box_pooler.level_poolers] == [1 / 2, 1 / 4, 1 / 8, 1 / 16]
    assert model.backbone.net.visual.window_size == 0  # global attention, unlike the ViTDet config it shares
    _train_step_and_predict(model, with_masks=True)


@needs_d2
def test_backbone_equals_core_and_loads_official_checkpoint(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    core = create_model("tiny", seed=4)
    random_alpha_conv_(core)
    save_official(core, tmp_path / "alpha.pth")
    model = build_model(_yacs("faster_rcnn_alphaclip_vit_b16_sfp.yaml"))
    DetectionCheckpointer(model).load(str(tmp_path / "alpha.pth"))
    tower = model.backbone.net.visual
    for k, v in core.visual.state_dict().items():
        assert torch.equal(tower.state_dict()[k], v), k
    net = model.backbone.net.eval()
    for size in ((32, 32), (48, 80)):
        x = torch.randn(2, 3, *size)
        a = random_alpha(2, max(size))[..., : size[0], : size[1]]
        with torch.no_grad():
            feat = net(torch.cat([x, a], 1))["last_feat"]
            (ref,) = core.visual.forward_intermediates(x, a, indices=[-1], intermediates_only=True)
        assert (feat - ref).abs().max() < 1e-5
    assert model.backbone.output_shape()["p1"].stride == 2


@needs_d2
def test_dataset_mapper_adds_aligned_alpha(tmp_path):
    from PIL import Image

    from alphaclip_plugins.integrations.detectron2 import AlphaDatasetMapper
    from detectron2.data import transforms as T
    from detectron2.structures import BoxMode

    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "img.png")
    d = dict(file_name=str(tmp_path / "img.png"), height=40, width=60,
             annotations=[dict(bbox=[10, 5, 20, 15], bbox_mode=BoxMode.XYXY_ABS, category_id=0)])
    mapper = AlphaDatasetMapper(is_train=True, augmentations=[T.Resize((80, 120))], image_format="RGB",
                                alpha_source="gt_boxes")
    out = mapper(d)
    assert out["image"].shape == (4, 80, 120)
    alpha = out["image"][3] > 127
    assert alpha[10:30, 20:40].all() and alpha.sum() == 400
    assert out["instances"].gt_boxes.tensor.tolist() == [[20.0, 10.0, 40.0, 30.0]]


@needs_d2
def test_open_vocab_config_rescores_and_swaps_vocabulary(tmp_path):
    from detectron2.modeling import build_model

    from alphaclip_plugins import save_pretrained
    from alphaclip_plugins.core.zeroshot import save_text_embeddings
    from alphaclip_plugins.integrations.detectron2 import set_vocabulary

    clip = create_model("tiny", seed=2)
    random_alpha_conv_(clip)
    save_pretrained(clip, tmp_path / "clip")
    cfg = _yacs("ov_faster_rcnn_alphaclip_vit_b16_sfp.yaml")
    classes = ["red circle", "blue square", "green triangle", "yellow star"]
    cfg.MODEL.ALPHACLIP.update(TEXT_EMBEDDINGS=str(tmp_path / "text.safetensors"), CLASS_NAMES=classes,
                               CLIP=str(tmp_path / "clip"), NOVEL_CLASSES=["yellow star"])
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(classes)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg)
    assert not any(p.requires_grad for p in model.backbone.net.parameters())  # frozen (F-VLM)
    _train_step_and_predict(model)
    with torch.no_grad():
        inst = model(_inputs(3))[0]["instances"]
    assert len(inst) > 0 and inst.clip_scores.shape == (len(inst), 4)
    save_text_embeddings(clip, ["cat", "dog", "car"], tmp_path / "new.safetensors")
    set_vocabulary(model, tmp_path / "new.safetensors")
    with torch.no_grad():
        inst = model(_inputs(3))[0]["instances"]
    assert inst.clip_scores.shape[1] == 3 and int(inst.pred_classes.max()) < 3


@needs_d2
def test_region_scorer_with_the_embedded_model_ranks_the_right_label():
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances

    from alphaclip_plugins.train.synthetic import labels
    from conftest import shape_scenes

    names = labels()
    cfg = _yacs("ov_faster_rcnn_alphaclip_vit_b16_sfp.yaml")
    cfg.MODEL.ALPHACLIP.update(CLASS_NAMES=names, CLIP="default", NOVEL_CLASSES=[])
    cfg.MODEL.ALPHACLIP.TEXT_EMBEDDINGS = ""
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"  # only the re-scoring is under test here
    model = build_model(cfg).eval()
    hits = total = 0
    for image, gt, gt_labels, extra in shape_scenes(12, seed=1):
        h, w = image.shape[:2]
        # The network saw the image at twice its size; boxes are in original pixels, as detectron2 returns.
        big = torch.from_numpy(np.array(image)).permute(2, 0, 1).repeat_interleave(2, 1).repeat_interleave(2, 2)
        n = len(gt) + len(extra)  # distinct detector scores: the re-scored order maps back to the boxes
        inst = Instances((h, w), pred_boxes=Boxes(torch.tensor(gt + extra, dtype=torch.float32)),
                         pred_classes=torch.zeros(n, dtype=torch.long), scores=torch.linspace(0.9, 0.5, n))
        model.rescorer.score_thr, model.rescorer.max_per_img = 0.0, 0
        out = model._rescore([dict(image=big, height=h, width=w)], [inst])[0]
        rows = [int((inst.pred_boxes.tensor == b).all(1).nonzero()[0, 0]) for b in out.pred_boxes.tensor]
        clip = torch.empty(n, len(names))
        clip[rows] = out.clip_scores
        hits += int((clip[: len(gt)].argmax(-1) == torch.tensor(gt_labels)).sum())
        total += len(gt)
    assert hits / total >= 0.9, f"region scorer top-1 {hits}/{total}"


@needs_d2
def test_alphaclip_checkpointer_reads_safetensors_of_any_layout(tmp_path):
    from detectron2.modeling import build_model

    from alphaclip_plugins.core.checkpoint import save_weights
    from alphaclip_plugins.integrations.detectron2 import AlphaCLIPCheckpointer

    core = create_model("tiny", seed=6)
    random_alpha_conv_(core)
    save_weights(core, tmp_path / "alpha.safetensors", fmt="timm")
    model = build_model(_yacs("faster_rcnn_alphaclip_vit_b16_sfp.yaml"))
    AlphaCLIPCheckpointer(model).load(str(tmp_path / "alpha.safetensors"))
    for k, v in core.visual.state_dict().items():
        assert torch.equal(model.backbone.net.visual.state_dict()[k], v), k
