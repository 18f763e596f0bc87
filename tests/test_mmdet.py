"""MMDetection: configs build, train a step and predict; the backbone equals the core; 4-channel data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from alphaclip_plugins import create_model
from alphaclip_plugins.core.alpha import ALPHA_BACKGROUND, ALPHA_FOREGROUND, CLIP_MEAN, CLIP_STD
from conftest import import_or_skip, random_alpha, random_alpha_conv_

import_or_skip("mmdet")
import_or_skip("mmcv.ops")
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from alphaclip_plugins.integrations import mmdet as ac_mmdet  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "mmdet"


def _tiny(cfg: Config) -> Config:
    """Shrink a config to the tiny architecture so that a CPU step takes a second."""
    cfg.model.backbone.update(arch="tiny", init_cfg=None)
    cfg.model.neck.in_channels = 64
    cfg.model.neck.out_channels = 32
    cfg.model.rpn_head.update(in_channels=32, feat_channels=32)
    cfg.model.roi_head.bbox_roi_extractor.out_channels = 32
    cfg.model.roi_head.bbox_head.update(in_channels=32, fc_out_channels=64)
    if "mask_head" in cfg.model.roi_head:
        cfg.model.roi_head.mask_roi_extractor.out_channels = 32
        cfg.model.roi_head.mask_head.update(in_channels=32, conv_out_channels=32)
    return cfg


def _batch(channels: int, with_masks: bool = False, seed: int = 0):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks

    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for h, w in ((64, 96), (80, 64)):
        img = torch.randint(0, 256, (channels, h, w), generator=g, dtype=torch.uint8)
        if channels == 4:
            img[3] = 0
            img[3, 10:40, 10:40] = 255
        s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0),
                                        pad_shape=(h, w)))
        gt = InstanceData(bboxes=torch.tensor([[10.0, 10.0, 40.0, 40.0], [30.0, 20.0, 60.0, 60.0]]),
                          labels=torch.tensor([1, 3]))
        if with_masks:
            m = np.zeros((2, h, w), np.uint8)
            m[0, 10:40, 10:40] = 1
            m[1, 20:60, 30:60] = 1
            gt.masks = BitmapMasks(m, h, w)
        s.gt_instances = gt
        inputs.append(img)
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize("name", ["faster-rcnn_alphaclip-vit-b16_sfp_1x_coco.py", "mask-rcnn_alphaclip-vit-b16_sfp_1x_coco.py"])
def test_config_builds_trains_and_predicts(name):
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    cfg = _tiny(Config.fromfile(str(CONFIGS / name)))
    model = MODELS.build(cfg.model)
    model.init_weights()
    masks = "mask" in name
    model.train()
    data = model.data_preprocessor(_batch(4, masks), True)
    assert data["inputs"].shape[1] == 4
    losses = model(**data, mode="loss")
    loss = sum(v for k, v in losses.items() if "loss" in k for v in (v if isinstance(v, list) else [v]))
    loss.backward()
    no_grad = [n for n, p in model.backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    model.eval()
    for channels in (4, 3):
        with torch.no_grad():
            out = model.test_step(_batch(channels, masks))
        assert len(out) == 2 and "bboxes" in out[0].pred_instances


def test_backbone_equals_core_at_native_and_interpolated_sizes(tmp_path):
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    core = create_model("tiny", seed=5)
    random_alpha_conv_(core)
    from alphaclip_plugins.core.checkpoint import save_official

    save_official(core, tmp_path / "alpha.pth")
    backbone = MODELS.build(dict(type="AlphaCLIPViT", arch="tiny", out_indices=(0, 1),
                                 init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "alpha.pth"))))
    backbone.init_weights()
    backbone.init_weights()  # the Runner may call it again: weights stay the file's
    for k, v in core.visual.state_dict().items():
        assert torch.equal(backbone.visual.state_dict()[k], v), k
    backbone.eval()
    for size in ((32, 32), (48, 80)):
        x = torch.randn(2, 3, *size)
        a = random_alpha(2, max(size))[..., : size[0], : size[1]]
        with torch.no_grad():
            feats = backbone(torch.cat([x, a], 1))
            ref = core.visual.forward_intermediates(x, a, indices=[0, 1], intermediates_only=True)
        assert len(feats) == 2
        for f, r in zip(feats, ref):
            assert f.shape == (2, 64, size[0] // 8, size[1] // 8)
            assert (f - r).abs().max() < 1e-5


def test_frozen_backbone_has_no_trainable_weights_and_stays_in_eval():
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    frozen = MODELS.build(dict(type="AlphaCLIPViT", arch="tiny", frozen=True)).train()
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.visual.training
    partial = MODELS.build(dict(type="AlphaCLIPViT", arch="tiny", frozen_stages=1))
    trainable = {n.split(".")[3] for n, p in partial.named_parameters() if p.requires_grad and "resblocks" in n}
    assert trainable == {"1"} and not partial.visual.conv1_alpha.weight.requires_grad


def test_preprocessor_normalises_alpha_like_the_core_and_swaps_only_rgb():
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    pre = MODELS.build(dict(type="AlphaDetDataPreprocessor", bgr_to_rgb=True, pad_size_divisor=32))
    img = torch.zeros(4, 30, 20, dtype=torch.uint8)
    img[0], img[1], img[2] = 10, 20, 30  # B, G, R
    img[3, :15] = 255
    out = pre(dict(inputs=[img], data_samples=None), False)["inputs"][0]
    assert out.shape == (4, 32, 32)
    rgb = torch.tensor([30.0, 20.0, 10.0]) / 255
    expected = (rgb - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[:3, 0, 0], expected, atol=1e-5)
    assert torch.allclose(out[3, :15, :20], torch.tensor(ALPHA_FOREGROUND), atol=1e-5)
    assert torch.allclose(out[3, 15:30, :20], torch.tensor(ALPHA_BACKGROUND), atol=1e-5)
    assert torch.allclose(out[3, :, 20:], torch.tensor(ALPHA_BACKGROUND), atol=1e-5)  # padding = background
    with pytest.raises(ValueError, match="all 3-channel or all 4-channel"):
        pre(dict(inputs=[img, img[:3]], data_samples=None), False)


def test_pipeline_adds_alpha_from_boxes_and_prompts():
    from mmcv.transforms import Compose
    from mmdet.structures.bbox import HorizontalBoxes

    init_default_scope("mmdet")
    img = np.zeros((40, 60, 3), np.uint8)
    results = dict(img=img.copy(), gt_bboxes=HorizontalBoxes(torch.tensor([[10.0, 5.0, 20.0, 15.0]])))
    out = Compose([dict(type="AddAlphaChannel", source="gt_bboxes")])(results)
    assert out["img"].shape == (40, 60, 4) and out["img"][5:15, 10:20, 3].min() == 255
    assert out["img"][..., 3].sum() == 255 * 100
    prompt = Compose([dict(type="AddAlphaChannel", source="prompt")])(dict(img=img.copy(), alpha_prompt=[0, 0, 30, 40]))
    assert prompt["img"][..., 3].sum() == 255 * 30 * 40
    whole = Compose([dict(type="AddAlphaChannel")])(dict(img=img.copy()))
    assert whole["img"][..., 3].min() == 255


def test_open_vocab_config_trains_predicts_rescores_and_swaps_vocabulary(tmp_path):
    from mmdet.registry import MODELS

    from alphaclip_plugins import save_pretrained
    from alphaclip_plugins.core.zeroshot import save_text_embeddings

    init_default_scope("mmdet")
    clip = create_model("tiny", seed=2)
    random_alpha_conv_(clip)
    save_pretrained(clip, tmp_path / "clip")
    cfg = _tiny(Config.fromfile(str(CONFIGS / "ov-faster-rcnn_alphaclip-vit-b16_sfp_1x_coco.py")))
    classes = ["red circle", "blue square", "green triangle", "yellow star"]
    cfg.model.roi_head.bbox_head.num_classes = len(classes)
    cfg.model.roi_head.bbox_head.cls_predictor_cfg.update(
        text_embeddings=str(tmp_path / "text.safetensors"), class_names=classes, clip=str(tmp_path / "clip"))
    cfg.model.region_scorer.update(labels=classes, clip=str(tmp_path / "clip"), novel_classes=["yellow star"])
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert (tmp_path / "text.safetensors").exists()  # computed once, cached for the next build
    assert not any(p.requires_grad for p in model.backbone.parameters())  # frozen (F-VLM)
    model.train()
    losses = model(**model.data_preprocessor(_batch(4), True), mode="loss")
    sum(v for k, v in losses.items() if "loss" in k for v in (v if isinstance(v, list) else [v])).backward()
    assert model.roi_head.bbox_head.fc_cls.proj.weight.grad is not None
    model.eval()
    model.roi_head.test_cfg.score_thr = 0.0
    with torch.no_grad():
        out = model.test_step(_batch(4))
    pred = out[0].pred_instances
    assert len(pred) > 0 and pred.clip_scores.shape == (len(pred), 4)
    assert torch.all(pred.scores <= 1) and torch.all(pred.scores >= 0)

    new = ["cat", "dog", "car"]
    save_text_embeddings(clip, new, tmp_path / "new.safetensors")
    ac_mmdet.set_vocabulary(model, tmp_path / "new.safetensors")
    with torch.no_grad():
        out = model.test_step(_batch(3))
    pred = out[0].pred_instances
    assert pred.clip_scores.shape[1] == 3 and int(pred.labels.max()) < 3


def test_region_scorer_with_the_embedded_model_ranks_the_right_label():
    from mmdet.registry import MODELS

    from alphaclip_plugins.train.synthetic import labels
    from conftest import shape_scenes

    init_default_scope("mmdet")
    names = labels()
    scorer = MODELS.build(dict(type="AlphaCLIPRegionScorer", labels=names, clip="default"))
    subset = names[::-1][: len(names) // 2]  # a new vocabulary, in another order
    hits = total = sub_hits = sub_total = 0
    for image, gt, gt_labels, extra in shape_scenes(12):
        pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        boxes = torch.tensor(gt + extra, dtype=torch.float32)
        hits += int((scorer.score(pixels, boxes.tolist())[: len(gt)].argmax(-1) == torch.tensor(gt_labels)).sum())
        total += len(gt)
        scorer.rescorer.set_vocabulary(subset)  # no rebuild: the next call scores against the new classes
        clip = scorer.score(pixels, boxes.tolist())
        for i, label in enumerate(gt_labels):
            if names[label] in subset:
                sub_hits += int(subset[int(clip[i].argmax())] == names[label])
                sub_total += 1
        scorer.rescorer.set_vocabulary(names)
    assert hits / total >= 0.9, f"region scorer top-1 {hits}/{total}"
    assert sub_total > 0 and sub_hits / sub_total >= 0.9, f"after the vocabulary swap {sub_hits}/{sub_total}"
