"""Open-vocabulary detection that trains, checkpoints and serves: mmengine checkpoints under torch's
weights_only, alpha padding, the vocabulary swap, the frozen scorer outside DDP and checkpoints, re-scoring."""
from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from conftest import import_or_skip

import_or_skip("mmdet")
import_or_skip("mmcv.ops")
from mmengine.model import BaseModel  # noqa: E402

from alphaclip_plugins.integrations import mmdet as ac_mmdet  # noqa: E402,F401  (registers the safe globals)


# --- 1. mmengine checkpoints under torch.load(weights_only=True) ----------------------------------------------
class _Toy(BaseModel):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, inputs, data_samples=None, mode="tensor"):
        y = self.lin(torch.stack(inputs))
        return dict(loss=y.pow(2).mean()) if mode == "loss" else y


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(inputs=torch.full((3,), float(i)))


def _runner(work_dir, max_iters: int = 3, **kw):
    from mmengine.runner import Runner

    return Runner(
        model=_Toy(), work_dir=str(work_dir), train_cfg=dict(by_epoch=False, max_iters=max_iters),
        train_dataloader=dict(dataset=_Data(), sampler=dict(type="DefaultSampler", shuffle=True), batch_size=2,
                              num_workers=0),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.01)),
        param_scheduler=[dict(type="LinearLR", by_epoch=False, begin=0, end=2)],
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=3)), **kw)


def test_mmengine_checkpoints_load_with_weights_only_and_resume(tmp_path, monkeypatch):
    from mmengine.runner import load_checkpoint

    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    runner = _runner(tmp_path / "a")
    runner.train()
    path = tmp_path / "a" / "iter_3.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["meta"]["iter"] == 3
    history = ckpt["message_hub"]["log_scalars"]["train/loss"]
    assert len(history.data[0]) == 3 and history.mean() == pytest.approx(float(history.data[0].mean()))

    model = _Toy()
    load_checkpoint(model, str(path), map_location="cpu")  # mmengine's own loading
    assert torch.equal(model.lin.weight, runner.model.lin.weight)
    resumed = _runner(tmp_path / "b", max_iters=4, resume=True, load_from=str(path))
    resumed.train()
    assert resumed.iter == 4
    assert torch.load(tmp_path / "b" / "iter_4.pth", weights_only=True)["meta"]["iter"] == 4


class _Evil:
    def __reduce__(self):
        from mmengine.logging.history_buffer import HistoryBuffer

        return (getattr, (HistoryBuffer, "update"))  # pickled as builtins.getattr: only 4 names may pass


def test_the_allowed_globals_refuse_anything_else(tmp_path):
    import numpy as np

    path = tmp_path / "evil.pth"
    torch.save({"x": _Evil()}, path, pickle_protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing getattr"):
        torch.load(path, weights_only=True)
    torch.save({"x": np.ma.masked_array([1.0])}, path)
    with pytest.raises(pickle.UnpicklingError):  # an array subclass
        torch.load(path, weights_only=True)
    torch.save({"x": np.arange(5, dtype=np.float32), "y": np.float64(2.5)}, path)
    back = torch.load(path, weights_only=True)
    assert back["x"].tolist() == [0, 1, 2, 3, 4] and back["y"] == 2.5


# --- 2. padding: alpha is background wherever a pad transform adds pixels ---------------------------------------
def _rgba(h: int = 50, w: int = 70):
    import numpy as np

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    img[..., 3] = 255  # the whole image is the region
    return img


@pytest.mark.parametrize("pad_val", [dict(img=(114, 114, 114)), 114, dict(img=0)])
def test_alpha_pad_pads_alpha_as_background_and_rgb_as_asked(pad_val):
    import numpy as np
    from mmengine.registry import init_default_scope
    from mmdet.registry import TRANSFORMS

    init_default_scope("mmdet")
    img = _rgba()
    out = TRANSFORMS.build(dict(type="AlphaPad", size_divisor=32, pad_val=pad_val))(dict(img=img.copy()))
    rgb_out = TRANSFORMS.build(dict(type="Pad", size_divisor=32, pad_val=pad_val))(dict(img=img[..., :3].copy()))
    padded = out["img"]
    assert padded.shape == (64, 96, 4) and out["pad_shape"] == (64, 96, 4)
    np.testing.assert_array_equal(padded[..., :3], rgb_out["img"])  # RGB exactly as mmdet pads it
    assert (padded[:50, :70, 3] == 255).all()
    assert (padded[50:, :, 3] == 0).all() and (padded[:, 70:, 3] == 0).all()
    value = pad_val["img"] if isinstance(pad_val, dict) else pad_val
    assert (padded[50:, :, :3] == np.asarray(value)).all()
    with pytest.raises(ValueError, match="3 values"):
        TRANSFORMS.build(dict(type="AlphaPad", size_divisor=32, pad_val=dict(img=(1, 2, 3, 4))))(dict(img=img.copy()))


def test_preprocessor_pads_alpha_as_background_also_in_batch_fixed_size_pad():
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample

    from alphaclip_plugins.detection.inputs import ALPHA_BACKGROUND_255

    init_default_scope("mmdet")
    aug = [dict(type="BatchFixedSizePad", size=(128, 128))]
    ours = MODELS.build(dict(type="AlphaDetDataPreprocessor", bgr_to_rgb=True, pad_size_divisor=32,
                             batch_augments=aug))
    plain = MODELS.build(dict(type="DetDataPreprocessor", mean=ours.mean.flatten().tolist(),
                              std=ours.std.flatten().tolist(), bgr_to_rgb=True, pad_size_divisor=32,
                              batch_augments=aug))
    shapes = ((50, 70), (90, 40))
    imgs = [torch.from_numpy(_rgba(h, w)).permute(2, 0, 1).contiguous() for h, w in shapes]

    def batch(channels):
        samples = [DetDataSample(metainfo=dict(img_shape=s, ori_shape=s)) for s in shapes]
        return dict(inputs=[x[:channels] for x in imgs], data_samples=samples)

    for training in (True, False):
        x = ours(batch(4), training)["inputs"]
        ref = plain(batch(3), training)["inputs"]
        torch.testing.assert_close(x[:, :3], ref, rtol=0, atol=0)  # RGB padding unchanged
        for i, (h, w) in enumerate(shapes):
            alpha = x[i, 3]
            assert torch.allclose(alpha[:h, :w], torch.tensor(1.9231), atol=1e-4)
            outside = torch.ones_like(alpha, dtype=torch.bool)
            outside[:h, :w] = False
            assert torch.allclose(alpha[outside], torch.tensor(-1.9231), atol=1e-4)
        assert x.shape[-2:] == ((128, 128) if training else (96, 96))
    assert ALPHA_BACKGROUND_255 == pytest.approx(-1.9231, abs=1e-4)


# --- 3. the vocabulary as one operation: the CLI writes it, set_vocabulary updates every class name ---------------
OLD = ["red circle", "blue square", "green triangle", "yellow star"]
NEW = ["cat", "dog", "car", "tree", "boat", "kite"]  # more classes than before: stale names would IndexError


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from alphaclip_plugins import create_model, save_pretrained
    from conftest import random_alpha_conv_

    clip = create_model("tiny", seed=2)
    random_alpha_conv_(clip)
    path = tmp_path_factory.mktemp("clip") / "clip"
    save_pretrained(clip, path)
    return path


def _vocab(tmp_path, clip_dir, names, out="vocab.safetensors", *extra):
    from alphaclip_plugins.cli import main

    classes = tmp_path / f"{out}.txt"
    classes.write_text("# a vocabulary\n" + "\n".join(names) + "\n\n")
    main(["vocab", str(classes), "-o", str(tmp_path / out), "--model", str(clip_dir), "--templates", "clip", *extra])
    return tmp_path / out


def test_vocab_cli_writes_embeddings_refuses_to_overwrite_and_checks_the_list(tmp_path, clip_dir, capsys):
    from alphaclip_plugins import from_pretrained
    from alphaclip_plugins.cli import Failure
    from alphaclip_plugins.core.zeroshot import load_text_embeddings, text_classifier

    path = _vocab(tmp_path, clip_dir, NEW)
    emb, labels = load_text_embeddings(path)
    assert labels == NEW and "wrote" in capsys.readouterr().out
    expected = text_classifier(from_pretrained(clip_dir).eval(), NEW, "clip")
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-6)
    with pytest.raises(Failure) as e:
        _vocab(tmp_path, clip_dir, OLD)
    assert e.value.code == 2 and "already exists; pass --force" in str(e.value)
    capsys.readouterr()
    assert load_text_embeddings(path)[1] == NEW  # untouched
    _vocab(tmp_path, clip_dir, OLD, "vocab.safetensors", "--force")
    assert load_text_embeddings(path)[1] == OLD
    for names, message in (([], "holds no class names"), (["cat", "dog", "cat"], "'cat' more than once")):
        with pytest.raises(Failure, match=message):
            _vocab(tmp_path, clip_dir, names, "bad.safetensors")
        err = capsys.readouterr().err.strip()
        assert err.startswith("alphaclip: error:") and "\n" not in err
    with pytest.raises(Failure, match="does not exist"):
        _vocab(tmp_path, clip_dir.parent / "missing", ["cat"], "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def _mmdet_ov_cfg(tmp_path, clip_dir):
    from mmengine.config import Config

    from test_mmdet import CONFIGS, _tiny

    cfg = _tiny(Config.fromfile(str(CONFIGS / "ov-faster-rcnn_alphaclip-vit-b16_sfp_1x_coco.py")))
    cfg.model.roi_head.bbox_head.num_classes = len(OLD)
    cfg.model.roi_head.bbox_head.cls_predictor_cfg.update(
        text_embeddings=str(tmp_path / "text.safetensors"), class_names=OLD, clip=str(clip_dir))
    cfg.model.region_scorer.update(labels=OLD, clip=str(clip_dir), novel_classes=["yellow star"])
    cfg.model.test_cfg.rcnn.score_thr = 0.0
    for pipeline in (cfg.test_dataloader.dataset.pipeline,):
        next(t for t in pipeline if t.type == "Resize").scale = (128, 128)
    return cfg


def _textured_image(path, h: int = 96, w: int = 128):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    img = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    img[20:60, 30:90] = (200, 40, 40)
    Image.fromarray(img).save(path)
    return img


def test_mmdet_inferencer_works_after_a_vocabulary_swap(tmp_path, clip_dir):
    from mmdet.apis import DetInferencer
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    from mmengine.runner import save_checkpoint

    init_default_scope("mmdet")
    cfg = _mmdet_ov_cfg(tmp_path, clip_dir)
    cfg.dump(str(tmp_path / "ov.py"))
    model = MODELS.build(cfg.model)
    model.init_weights()
    save_checkpoint(dict(state_dict=model.state_dict(), meta=dict(dataset_meta=dict(classes=tuple(OLD)))),
                    str(tmp_path / "ov.pth"))
    _textured_image(tmp_path / "img.png")
    inferencer = DetInferencer(model=str(tmp_path / "ov.py"), weights=str(tmp_path / "ov.pth"), device="cpu")
    before = inferencer(str(tmp_path / "img.png"), return_vis=True, no_save_vis=True, pred_score_thr=0.0)
    assert max(before["predictions"][0]["labels"]) < len(OLD)

    from alphaclip_plugins.integrations.mmdet import set_vocabulary

    vocab = _vocab(tmp_path, clip_dir, NEW)
    assert set_vocabulary(inferencer.model, vocab) == NEW  # the inferencer's visualiser is mmengine's current one
    assert inferencer.model.dataset_meta["classes"] == tuple(NEW)
    assert inferencer.visualizer.dataset_meta["classes"] == tuple(NEW)
    after = inferencer(str(tmp_path / "img.png"), return_vis=True, no_save_vis=True, pred_score_thr=0.0,
                       return_datasamples=True)
    pred = after["predictions"][0].pred_instances
    assert len(pred) > 0 and pred.clip_scores.shape[1] == len(NEW)
    assert len(NEW) > int(pred.labels.max()) >= len(OLD)  # new labels were drawn and named: no IndexError
    assert after["visualization"][0].shape == (96, 128, 3)


def _d2_ov_cfg(tmp_path, clip_dir, dataset: str):
    from test_detectron2 import _yacs

    cfg = _yacs("ov_faster_rcnn_alphaclip_vit_b16_sfp.yaml")
    cfg.MODEL.ALPHACLIP.update(TEXT_EMBEDDINGS=str(tmp_path / "text_d2.safetensors"), CLASS_NAMES=OLD,
                               CLIP=str(clip_dir), NOVEL_CLASSES=["yellow star"])
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(OLD)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 128
    cfg.DATASETS.TEST = (dataset,)
    return cfg


def test_detectron2_predictor_works_after_a_vocabulary_swap(tmp_path, clip_dir):
    import_or_skip("detectron2", allow_missing=True)  # not on PyPI: skips even under CI
    from detectron2.data import MetadataCatalog
    from detectron2.engine import DefaultPredictor
    from detectron2.utils.visualizer import Visualizer

    from alphaclip_plugins.integrations.detectron2 import set_vocabulary

    name = f"alphaclip_ovd_test_{tmp_path.name}"
    MetadataCatalog.get(name).set(thing_classes=list(OLD), thing_colors=[(1, 2, 3)] * len(OLD))
    predictor = DefaultPredictor(_d2_ov_cfg(tmp_path, clip_dir, name))
    image = _textured_image(tmp_path / "img.png")[..., ::-1].copy()  # BGR, as DefaultPredictor reads
    assert int(predictor(image)["instances"].pred_classes.max()) < len(OLD)
    vocab = _vocab(tmp_path, clip_dir, NEW)
    assert set_vocabulary(predictor.model, vocab, dataset=name) == name
    assert MetadataCatalog.get(name).thing_classes == NEW and predictor.metadata.thing_classes == NEW
    inst = predictor(image)["instances"]
    assert inst.clip_scores.shape[1] == len(NEW)
    assert len(NEW) > int(inst.pred_classes.max()) >= len(OLD)
    drawn = Visualizer(image[..., ::-1], predictor.metadata).draw_instance_predictions(inst)  # names every label
    assert drawn.get_image().shape == image.shape
    fresh = set_vocabulary(predictor.model, vocab)  # no dataset: one is registered for the vocabulary
    assert fresh == "alphaclip_vocab_vocab" and MetadataCatalog.get(fresh).thing_classes == NEW


# --- 4. the frozen scorer is outside DDP and checkpoints; the vocabulary is inside them --------------------------
def _build_mmdet(cfg):
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model.eval()


def test_mmdet_scorer_is_frozen_outside_the_state_dict_and_the_vocabulary_inside(tmp_path, clip_dir):
    from mmengine.runner import load_checkpoint, save_checkpoint

    from alphaclip_plugins.core.zeroshot import save_text_embeddings
    from alphaclip_plugins.integrations.mmdet import set_vocabulary
    from test_mmdet import _batch

    cfg = _mmdet_ov_cfg(tmp_path, clip_dir)
    model = _build_mmdet(cfg)
    sd = model.state_dict()
    assert not [k for k in sd if k.startswith("region_scorer.")]
    assert not [n for n, _ in model.named_parameters() if n.startswith("region_scorer.")]
    clip = model.region_scorer.clip
    assert clip.visual.conv1.weight.numel() and not any(p.requires_grad for p in clip.parameters())
    assert sd["roi_head.bbox_head.fc_cls.text_embeddings"].shape == (len(OLD), clip.text_projection.shape[1])

    # a vocabulary of the same size, set before saving: the checkpoint, not the file, brings it back
    from alphaclip_plugins import from_pretrained

    save_text_embeddings(from_pretrained(clip_dir), OLD[::-1], tmp_path / "reversed.safetensors", "clip")
    set_vocabulary(model, tmp_path / "reversed.safetensors")
    with torch.no_grad():
        expected = model.test_step(_batch(4))
    save_checkpoint(dict(state_dict=model.state_dict()), str(tmp_path / "det.pth"))
    for f in ("text.safetensors", "reversed.safetensors"):
        (tmp_path / f).unlink()
    rebuilt = _build_mmdet(cfg)  # the embeddings file is gone
    fresh = rebuilt.roi_head.bbox_head.fc_cls.text_embeddings.clone()
    load_checkpoint(rebuilt, str(tmp_path / "det.pth"), map_location="cpu", strict=True)
    loaded = rebuilt.roi_head.bbox_head.fc_cls.text_embeddings
    assert torch.equal(loaded, model.roi_head.bbox_head.fc_cls.text_embeddings) and not torch.equal(loaded, fresh)
    rebuilt.region_scorer.rescorer.set_vocabulary(OLD[::-1])  # the scorer's names follow the swap, as before
    with torch.no_grad():
        got = rebuilt.test_step(_batch(4))
    for a, b in zip(expected, got):
        torch.testing.assert_close(a.pred_instances.bboxes, b.pred_instances.bboxes)
        torch.testing.assert_close(a.pred_instances.scores, b.pred_instances.scores)
    legacy = {**model.state_dict(), "region_scorer.clip.logit_scale": torch.zeros(())}  # an older checkpoint
    rebuilt.load_state_dict(legacy, strict=True)  # the scorer's saved CLIP is dropped: it is rebuilt instead
    model.half()
    assert clip.logit_scale.dtype == torch.float16  # .to() / .half() / .cuda() still reach it


def test_detectron2_scorer_is_frozen_and_outside_the_state_dict(tmp_path, clip_dir):
    import_or_skip("detectron2", allow_missing=True)  # not on PyPI: skips even under CI
    from detectron2.modeling import build_model

    model = build_model(_d2_ov_cfg(tmp_path, clip_dir, "unused"))
    sd = model.state_dict()
    assert not [k for k in sd if "rescorer" in k or k.startswith("clip.")]
    assert sd["roi_heads.box_predictor.cls_score.text_embeddings"].shape[0] == len(OLD)
    clip = model.rescorer.scorer.model
    assert not any(p.requires_grad for p in clip.parameters())
    model.half()
    assert clip.logit_scale.dtype == torch.float16


# --- 5. re-scoring: batched across images, top-k first, then fusion, sort, threshold and cut ---------------------
def _scenes(count: int = 3):
    import numpy as np

    rng = np.random.default_rng(5)
    out = []
    for i in range(count):
        h, w = 60 + 13 * i, 90 - 11 * i  # non-square, each its own shape
        image = torch.from_numpy(rng.random((3, h, w), dtype=np.float32))
        boxes = [[2.0 + j, 3.0, 30.0 + 5 * j, 40.0 - j] for j in range(3 + i)]
        out.append((image, boxes))
    return out


def test_regions_of_many_images_share_forwards_and_equal_the_core(clip_dir):
    from alphaclip_plugins import from_pretrained
    from alphaclip_plugins.detection.rescore import RegionScorer, encode_regions

    model = from_pretrained(clip_dir).eval()
    scorer = RegionScorer(model, OLD, templates="clip", batch_size=4)  # batches straddle images
    scenes = _scenes()
    batched = scorer.score_batch([s[0] for s in scenes], [s[1] for s in scenes] + [])
    for (image, boxes), got in zip(scenes, batched):
        torch.testing.assert_close(got, scorer(image, boxes), rtol=0, atol=1e-6)
        pixels, size = scorer.processor.pixels(image)
        alpha = scorer.processor.alphas(boxes, size)
        with torch.no_grad():
            ref = model.encode_image(pixels.expand(len(boxes), -1, -1, -1), alpha)
            ours = encode_regions(model.visual, model.visual.conv1(pixels), torch.zeros(len(boxes), dtype=torch.long), alpha)
        assert (ours - ref).abs().max() < 1e-5
    empty = scorer.score_batch([scenes[0][0], scenes[1][0]], [[], scenes[1][1]])
    assert empty[0].shape == (0, len(OLD)) and torch.allclose(empty[1], batched[1], atol=1e-6)


class _FixedScorer:
    """Alpha-CLIP probabilities given per image; records how many regions it was asked to score."""

    def __init__(self, probs):
        self.labels, self.probs, self.asked = ["a", "b"], probs, []

    def score_batch(self, images, regions):
        self.asked.append([len(r) for r in regions])
        return [p[: len(r)] for p, r in zip(self.probs, regions)]


def test_rescorer_prefilters_then_fuses_sorts_thresholds_and_cuts():
    from alphaclip_plugins.detection.rescore import DetectionRescorer, fuse_scores

    image = torch.zeros(3, 50, 50)
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 5)
    labels = torch.tensor([0, 1, 0, 1, 0])
    det = torch.tensor([0.9, 0.6, 0.8, 0.04, 0.3])  # index 3 is under the threshold before fusion
    # rows follow the detector's order after the top-k: indices 0, 2, 1, 4 (3 is cut by topk=4)
    clip = torch.tensor([[0.02, 0.98], [0.99, 0.01], [0.1, 0.9], [0.97, 0.03]])
    scorer = _FixedScorer([clip])
    rescorer = DetectionRescorer(scorer, alpha_base=0.5, topk=4, score_thr=0.2, max_per_img=2)
    r = rescorer(image, boxes, labels, det)
    assert scorer.asked == [[4]]  # only the detector's best 4 were scored
    top = torch.tensor([0, 2, 1, 4])
    full = torch.zeros(4, 2)
    full[torch.arange(4), labels[top]] = det[top]
    fused = fuse_scores(full, clip, alpha_base=0.5)[torch.arange(4), labels[top]]
    order = fused.argsort(descending=True)
    expected = order[fused[order] > 0.2][:2]
    assert r.keep.tolist() == top[expected].tolist() and r.keep.tolist() != [0, 2]  # not the detector's order
    torch.testing.assert_close(r.scores, fused[expected])
    torch.testing.assert_close(r.clip_scores, clip[expected])
    assert r.scores[0] >= r.scores[1] > 0.2
    # detection 0 had the best detector score but Alpha-CLIP disagrees: it falls under the threshold
    assert 0 not in r.keep.tolist()
    low = DetectionRescorer(_FixedScorer([clip]), alpha_base=0.5, topk=0, score_thr=0.0, max_per_img=0)
    assert len(low(image, boxes[:4], labels[:4], det[:4]).keep) == 4
    none = low(image, boxes[:0], labels[:0], det[:0])
    assert none.keep.numel() == 0 and none.clip_scores.shape[0] == 0


def test_mmdet_and_detectron2_apply_their_test_cut_after_fusion(tmp_path, clip_dir):
    from test_mmdet import _batch

    cfg = _mmdet_ov_cfg(tmp_path, clip_dir)
    cfg.model.test_cfg.rcnn.update(score_thr=1e-4, max_per_img=7)
    cfg.model.region_scorer.topk = 30
    model = _build_mmdet(cfg)
    rescorer = model.region_scorer.rescorer
    assert (rescorer.score_thr, rescorer.max_per_img, rescorer.topk) == (1e-4, 7, 30)
    assert model.roi_head.test_cfg.score_thr == 0.0 and model.roi_head.test_cfg.max_per_img == 30
    with torch.no_grad():
        for sample in model.test_step(_batch(4)):
            s = sample.pred_instances.scores
            assert 0 < len(s) <= 7 and (s > 1e-4).all() and torch.equal(s, s.sort(descending=True).values)

    import_or_skip("detectron2", allow_missing=True)  # not on PyPI: skips even under CI
    from detectron2.modeling import build_model

    from test_detectron2 import _inputs

    d2 = _d2_ov_cfg(tmp_path, clip_dir, "unused")
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST, d2.TEST.DETECTIONS_PER_IMAGE = 1e-4, 7
    d2.MODEL.ALPHACLIP.RESCORE_TOPK = 30
    model = build_model(d2).eval()
    predictor = model.roi_heads.box_predictor
    assert (model.rescorer.score_thr, model.rescorer.max_per_img) == (1e-4, 7)
    assert predictor.test_score_thresh == 0.0 and predictor.test_topk_per_image == 30
    with torch.no_grad():
        for out in model(_inputs(3)):
            s = out["instances"].scores
            assert 0 < len(s) <= 7 and (s > 1e-4).all() and torch.equal(s, s.sort(descending=True).values)


def test_scorer_defaults_to_the_backbones_architecture_and_weights(tmp_path, clip_dir):
    from alphaclip_plugins import create_model, from_pretrained
    from alphaclip_plugins.core.checkpoint import save_official
    from conftest import random_alpha_conv_

    clip = from_pretrained(clip_dir)
    cfg = _mmdet_ov_cfg(tmp_path, clip_dir)
    cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=str(clip_dir))  # a full CLIP: both towers
    cfg.model.region_scorer.update(clip="backbone", text_checkpoint=None)
    model = _build_mmdet(cfg)
    scorer = model.region_scorer.clip
    for k, v in clip.state_dict().items():
        assert torch.equal(scorer.state_dict()[k], v), k
    assert torch.equal(model.backbone.visual.conv1_alpha.weight, scorer.visual.conv1_alpha.weight)

    tower = create_model("tiny", seed=9)  # an official vision-tower file: the text tower comes from text_checkpoint
    random_alpha_conv_(tower, seed=4)
    save_official(tower, tmp_path / "tower.pth")
    cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=str(tmp_path / "tower.pth"))
    cfg.model.region_scorer.text_checkpoint = str(clip_dir)
    scorer = _build_mmdet(cfg).region_scorer.clip
    assert torch.equal(scorer.visual.conv1_alpha.weight, tower.visual.conv1_alpha.weight)
    assert torch.equal(scorer.token_embedding.weight, clip.token_embedding.weight)
    cfg.model.region_scorer.text_checkpoint = None
    with pytest.raises(ValueError, match="vision tower only.*text_checkpoint"):
        _build_mmdet(cfg)

    import_or_skip("detectron2", allow_missing=True)  # not on PyPI: skips even under CI
    from detectron2.modeling import build_model

    d2 = _d2_ov_cfg(tmp_path, clip_dir, "unused")
    d2.MODEL.ALPHACLIP.update(CLIP="backbone", CLIP_CHECKPOINT=str(tmp_path / "tower.pth"),
                              CLIP_TEXT_CHECKPOINT=str(clip_dir))
    scorer = build_model(d2).rescorer.scorer.model
    assert torch.equal(scorer.visual.conv1_alpha.weight, tower.visual.conv1_alpha.weight)
    assert torch.equal(scorer.token_embedding.weight, clip.token_embedding.weight)


# --- 6. crop re-scoring (the usual CLIP way), the comparison row of the open-vocabulary benchmark ------------
def test_crop_mode_scores_each_box_cropped_with_whole_image_alpha(clip_dir):
    import numpy as np

    from alphaclip_plugins import from_pretrained
    from alphaclip_plugins.core.alpha import ALPHA_FOREGROUND
    from alphaclip_plugins.detection.rescore import RegionScorer, crop_region

    model = from_pretrained(clip_dir).eval()
    crop = RegionScorer(model, OLD, templates="clip", batch_size=3, region_mode="crop")
    alpha = RegionScorer(model, OLD, templates="clip", batch_size=3)
    scenes = _scenes()
    got = crop.score_batch([s[0] for s in scenes], [s[1] for s in scenes])
    scale, weights = model.logit_scale.exp(), crop.weights.T
    for (image, boxes), probs in zip(scenes, got):
        for box, p in zip(boxes, probs):
            x0, y0, x1, y1 = (int(v) for v in box)
            px, _ = crop.processor.pixels(image[:, y0:y1, x0:x1])  # the box's own pixels, seen whole
            with torch.no_grad():
                feats = model.encode_image(px, torch.full((1, 1, *px.shape[-2:]), ALPHA_FOREGROUND))
            ref = (scale * torch.nn.functional.normalize(feats, dim=-1) @ weights).softmax(-1)[0]
            assert (p - ref).abs().max() < 1e-5
        assert not torch.allclose(probs, alpha(image, boxes), atol=1e-3)  # not the alpha mode's answer
    image = scenes[0][0]
    mask = np.zeros(image.shape[-2:], bool)
    mask[5:20, 7:30] = True
    mask[12, 40] = True  # a stray pixel widens the bounding box
    assert crop_region(image, mask).shape == (3, 15, 34)
    assert torch.equal(crop_region(image, mask), image[:, 5:20, 7:41])
    with pytest.raises(ValueError, match="covers no pixel"):
        crop_region(image, np.zeros(image.shape[-2:], bool))
    with pytest.raises(ValueError, match="'alpha' .* or 'crop'"):
        RegionScorer(model, OLD, region_mode="box")


def test_both_frameworks_pass_the_crop_mode_to_the_scorer(tmp_path, clip_dir):
    cfg = _mmdet_ov_cfg(tmp_path, clip_dir)
    assert _build_mmdet(cfg).region_scorer.rescorer.scorer.region_mode == "alpha"
    cfg.model.region_scorer.mode = "crop"
    assert _build_mmdet(cfg).region_scorer.rescorer.scorer.region_mode == "crop"

    import_or_skip("detectron2", allow_missing=True)  # not on PyPI: skips even under CI
    from detectron2.modeling import build_model

    d2 = _d2_ov_cfg(tmp_path, clip_dir, "unused")
    d2.MODEL.ALPHACLIP.RESCORE_MODE = "crop"
    assert build_model(d2).rescorer.scorer.region_mode == "crop"
