"""Alpha prompts from the COCO JSON reach both frameworks' data paths and move with the image; the
open-vocabulary configs train without novel-class annotations (the test sets keep them); detectron2's own
``tools/train_net.py`` (with the documented one-line change) and ``tools/lazyconfig_train_net.py`` (unchanged)
run the package's configs.

The set is textured and non-square, and every image's prompt differs from its annotations, so a whole-image
fallback or alpha drawn from the boxes would show.
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alphaclip_plugins.core.regions import region_mask
from conftest import import_or_skip

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("square", "bar", "block")
NOVEL = "block"
H, W = 72, 104


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def _prompts():
    ellipse = np.zeros((H, W), bool)
    yy, xx = np.mgrid[0:H, 0:W]
    ellipse[((yy - 40) / 24.0) ** 2 + ((xx - 34) / 20.0) ** 2 <= 1] = True
    return [[20, 30, 70, 64], {"polygon": [5, 60, 50, 5, 100, 66]}, _rle(ellipse), {"box": [0, 0, 52, 36]}]


def prompt_coco(root: Path) -> Path:
    """4 textured 72 x 104 images with an alpha prompt each; images 0-2 hold a square, a bar and a (novel)
    block, image 3 only a block. Boxes carry rectangle polygons (for mask heads)."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    images, annotations = [], []
    for i, prompt in enumerate(_prompts()):
        img = rng.integers(0, 120, (H, W, 3), dtype=np.uint8)
        img[:, ::5] = (30, 200, 90)  # stripes: texture a wrong resize would move
        boxes = [(0, [8 + 2 * i, 8, 30 + 2 * i, 30]), (1, [40, 44, 96, 56]), (2, [60, 10, 90, 36])] if i < 3 else [
            (2, [30, 20, 80, 60])]
        for label, (x0, y0, x1, y1) in boxes:
            img[y0:y1, x0:x1] = (220, 40 + 80 * label, 40)
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=label + 1, iscrowd=0,
                                    bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0),
                                    segmentation=[[x0, y0, x1, y0, x1, y1, x0, y1]]))
        Image.fromarray(img).save(root / "img" / f"{i}.png")
        images.append(dict(id=i + 1, file_name=f"{i}.png", height=H, width=W, alpha_prompt=prompt))
    categories = [dict(id=k + 1, name=n) for k, n in enumerate(CLASSES)]
    path = root / "instances.json"
    path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return path


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _expected(prompt, shape, flip: bool = False) -> np.ndarray:
    """The prompt's region, resized (nearest) to ``shape`` and flipped as the image was."""
    mask = Image.fromarray(region_mask(prompt, H, W).astype(np.uint8) * 255).resize(shape[::-1], Image.NEAREST)
    mask = np.asarray(mask) > 127
    return mask[:, ::-1] if flip else mask


def _boxes_mask(boxes, shape) -> np.ndarray:
    return _expected(np.maximum.reduce([region_mask(list(b), H, W) for b in boxes]), shape)


def _check_alpha(alpha: np.ndarray, image_index: int, flip: bool = False) -> None:
    """``alpha`` [h, w] uint8 (255 = region) is image ``image_index``'s prompt moved with the image."""
    prompt = _prompts()[image_index]
    fg = alpha > 127
    assert 0.05 < fg.mean() < 0.8  # neither whole nor empty
    assert _iou(fg, _expected(prompt, alpha.shape, flip)) > 0.9
    assert _iou(fg, _expected(prompt, alpha.shape, not flip)) < 0.8  # the flip is seen
    gt = [[8 + 2 * image_index, 8, 30 + 2 * image_index, 30], [40, 44, 96, 56], [60, 10, 90, 36]]
    assert _iou(fg, _boxes_mask(gt, alpha.shape)) < 0.5  # not the annotations


# --- MMDetection -----------------------------------------------------------------------------------------------
def _mmdet_cfg(data: Path, source: str = "prompt"):
    from mmengine.config import Config

    cfg = Config.fromfile(str(ROOT / "configs" / "mmdet" / "ov-faster-rcnn_alphaclip-vit-b16_sfp_1x_coco.py"))
    files = dict(data_root=str(data.parent), ann_file=data.name, data_prefix=dict(img="img/"),
                 metainfo=dict(classes=CLASSES))
    train, test = cfg.train_dataloader.dataset, cfg.test_dataloader.dataset
    train.update(files, novel_classes=(NOVEL,), filter_cfg=dict(filter_empty_gt=True, min_size=8))
    test.update(files)
    for pipeline in (train.pipeline, test.pipeline):
        next(t for t in pipeline if t.type == "AddAlphaChannel").source = source
        next(t for t in pipeline if t.type == "Resize").scale = (150, 100)  # x 1.389: 100 x 144
    next(t for t in train.pipeline if t.type == "RandomFlip").prob = 1.0
    return cfg


def _mmdet_dataset(dataset_cfg):
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope

    import alphaclip_plugins.integrations.mmdet  # noqa: F401

    init_default_scope("mmdet")
    return DATASETS.build(dataset_cfg)


def test_mmdet_ov_config_delivers_prompts_and_trains_without_novel_classes(tmp_path):
    import_or_skip("mmdet")
    cfg = _mmdet_cfg(prompt_coco(tmp_path / "coco"))
    train = _mmdet_dataset(cfg.train_dataloader.dataset)
    assert len(train) == 3  # image 3 held only the novel class
    for i in range(len(train)):
        sample = train[i]
        inputs, meta = sample["inputs"].numpy(), sample["data_samples"].metainfo
        assert inputs.shape == (4, 100, 144) and meta["flip"]
        _check_alpha(inputs[3], meta["img_id"] - 1, flip=True)
        labels = sample["data_samples"].gt_instances.labels.tolist()
        assert sorted(labels) == [0, 1]  # square and bar keep their labels; no block

    test = _mmdet_dataset(cfg.test_dataloader.dataset)
    assert len(test) == 4
    labels = [i["bbox_label"] for k in range(len(test)) for i in test.get_data_info(k)["instances"]]
    assert labels.count(CLASSES.index(NOVEL)) == 4  # the test set keeps the novel class
    sample = test[0]
    _check_alpha(sample["inputs"].numpy()[3], sample["data_samples"].metainfo["img_id"] - 1)


def test_mmdet_prompt_source_without_a_prompt_is_an_error_unless_it_falls_back(tmp_path):
    import_or_skip("mmdet")
    cfg = _mmdet_cfg(prompt_coco(tmp_path / "coco"))
    plain = dict(cfg.test_dataloader.dataset, type="CocoDataset")  # mmdet's own: it drops images[i] fields
    with pytest.raises(ValueError, match=r"has no 'alpha_prompt'.*AlphaCocoDataset.*fallback='whole'"):
        _mmdet_dataset(plain)[0]
    add_alpha = next(t for t in plain["pipeline"] if t["type"] == "AddAlphaChannel")
    add_alpha["fallback"] = "whole"
    assert (_mmdet_dataset(plain)[0]["inputs"][3] == 255).all()


# --- Detectron2 ------------------------------------------------------------------------------------------------
def _d2_tools() -> Path:
    import_or_skip("detectron2", allow_missing=True)  # not on PyPI: skips even under CI
    import detectron2

    tools = Path(detectron2.__file__).resolve().parents[1] / "tools"
    if not (tools / "train_net.py").exists():
        pytest.skip("detectron2's tools/ are not next to its package (install it from a source checkout)")
    return tools


def _register(data: Path, tag: str):
    from alphaclip_plugins.integrations.detectron2 import register_alpha_coco_instances

    names = (f"prompts_train_{tag}", f"prompts_test_{tag}")
    for name in names:
        register_alpha_coco_instances(name, {}, data, data.parent / "img")
    return names


def _record_training_inputs(monkeypatch) -> list:
    """Patch the detector so that every training batch it receives is kept."""
    from alphaclip_plugins.integrations.detectron2 import AlphaGeneralizedRCNN

    seen, forward = [], AlphaGeneralizedRCNN.forward

    def recording(self, batched_inputs):
        if self.training:
            seen.append((self, [dict(x) for x in batched_inputs]))
        return forward(self, batched_inputs)

    monkeypatch.setattr(AlphaGeneralizedRCNN, "forward", recording)
    return seen


def _run_tool(path, argv, monkeypatch) -> None:
    """Run a script file (a ``Path``) or a module (a dotted name) as ``__main__`` with ``argv``."""
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    if isinstance(path, Path):
        runpy.run_path(str(path), run_name="__main__")
    else:
        runpy.run_module(path, run_name="__main__", alter_sys=True)


def _finite_losses(out: Path) -> None:
    logs = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [r["total_loss"] for r in logs if "total_loss" in r]
    assert losses and all(np.isfinite(losses)), logs


def _hook_line() -> str:
    from alphaclip_plugins.integrations.detectron2 import trainer

    (line,) = [ln.strip() for ln in trainer.__doc__.splitlines() if "AlphaCLIPTrainer as DefaultTrainer" in ln]
    return line.split("  #")[0]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP directory (text embeddings, re-scoring) and an official-layout tiny tower (MODEL.WEIGHTS)."""
    from alphaclip_plugins import create_model, save_pretrained
    from alphaclip_plugins.core.checkpoint import save_official
    from conftest import random_alpha_conv_

    root = tmp_path_factory.mktemp("tiny")
    clip = create_model("tiny", seed=2)
    random_alpha_conv_(clip)
    save_pretrained(clip, root / "clip")
    save_official(clip, root / "tower.pth")
    return root


@pytest.mark.parametrize("config,runner", [("ov_faster_rcnn_alphaclip_vit_b16_sfp.yaml", "tool"),
                                           ("faster_rcnn_alphaclip_vit_b16_sfp.yaml", "tool"),
                                           ("faster_rcnn_alphaclip_vit_b16_sfp.yaml", "module")])
def test_detectron2_train_net_with_the_hook_line_honours_alpha_source_optimizer_and_novel_classes(
        tmp_path, monkeypatch, tiny_clip, config, runner):
    """detectron2's tools/train_net.py with the README's line added (or the package's train_net module)."""
    tools = _d2_tools()
    from detectron2.data import DatasetCatalog

    from alphaclip_plugins.integrations.detectron2 import AlphaCLIPTrainer

    line = _hook_line()
    assert line in (ROOT / "README.md").read_text()  # the README documents the same line
    source = (tools / "train_net.py").read_text()
    first_def = source.index("\ndef ")
    tool = tmp_path / "train_net.py"
    tool.write_text(source[:first_def] + "\n" + line + "\n" + source[first_def:])
    if runner == "module":
        tool = "alphaclip_plugins.integrations.detectron2.train_net"  # python -m ...

    ov = config.startswith("ov_")
    train_name, test_name = _register(prompt_coco(tmp_path / "coco"), f"{config[:2]}_{tmp_path.name}")
    optimizers, build_optimizer = [], AlphaCLIPTrainer.build_optimizer
    monkeypatch.setattr(AlphaCLIPTrainer, "build_optimizer", classmethod(
        lambda cls, cfg, model: optimizers.append(build_optimizer(cfg, model)) or optimizers[-1]))
    seen = _record_training_inputs(monkeypatch)
    opts = [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(tiny_clip / "tower.pth"), "OUTPUT_DIR", str(tmp_path / "out"),
        "MODEL.ALPHACLIP.ARCH", "tiny", "MODEL.ALPHACLIP.OUT_STRIDE", "16", "MODEL.ALPHACLIP.SFP_OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
        "DATASETS.TRAIN", f"('{train_name}',)", "DATASETS.TEST", f"('{test_name}',)", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.ALPHA_SOURCE", "prompt", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.RANDOM_FLIP", "none", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "1000",
    ]
    if ov:
        opts += ["MODEL.ALPHACLIP.CLASS_NAMES", str(list(CLASSES)), "MODEL.ALPHACLIP.NOVEL_CLASSES", f"['{NOVEL}']",
                 "MODEL.ALPHACLIP.CLIP", str(tiny_clip / "clip"), "MODEL.ALPHACLIP.TEMPLATES", "clip",
                 "MODEL.ALPHACLIP.TEXT_EMBEDDINGS", str(tmp_path / "text.safetensors")]
    _run_tool(tool, ["--config-file", str(ROOT / "configs" / "detectron2" / config), *opts], monkeypatch)

    assert len(seen) == 2 and (tmp_path / "out" / "model_final.pth").exists()
    _finite_losses(tmp_path / "out")
    ids = set()
    for _, batch in seen:
        for x in batch:
            image = x["image"].numpy()
            assert image.shape == (4, 64, 92)
            _check_alpha(image[3], x["image_id"] - 1)
            classes = x["instances"].gt_classes.tolist()
            assert (CLASSES.index(NOVEL) in classes) is (not ov)  # held out by the OV config only
            ids.add(x["image_id"])
    if ov:
        assert 4 not in ids  # the image of novel annotations only is gone
    # AdamW over the config's rate, no decay on the tower's embeddings; MODEL.WEIGHTS read in the official layout.
    (optimizer,) = optimizers
    model = seen[0][0]
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    visual = model.backbone.net.visual
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-4)
    if not ov:  # the OV backbone is frozen, so it is in no group
        assert decay[id(visual.positional_embedding)] == decay[id(visual.class_embedding)] == 0.0
        assert decay[id(visual.ln_pre.bias)] == decay[id(visual.transformer.resblocks[0].attn.in_proj_bias)] == 0.0
        assert decay[id(visual.conv1.weight)] == pytest.approx(0.1)
    loaded = torch.load(tiny_clip / "tower.pth", weights_only=True)["conv1.weight"]
    assert (visual.conv1.weight.detach() - loaded).abs().max() < (1e-8 if ov else 1e-2)
    # The final evaluation mapped the test set (prompts and all) and scored it with the tool's COCOEvaluator.
    assert (tmp_path / "out" / "inference" / "coco_instances_results.json").exists()
    test_classes = [a["category_id"] for d in DatasetCatalog.get(test_name) for a in d["annotations"]]
    assert test_classes.count(CLASSES.index(NOVEL)) == 4


LAZY = {
    "mask_rcnn_alphaclip_vit_b16_sfp_lazy.py": [],
    "mask_rcnn_alphaclip_vit_b16_vitdet_lsj_100ep.py": ["model.backbone.net.window_size=2",
                                                       "model.backbone.net.global_blocks=[1]"],
}


@pytest.mark.parametrize("config", list(LAZY))
def test_detectron2_lazyconfig_train_net_runs_each_lazy_config(tmp_path, monkeypatch, config):
    tools = _d2_tools()
    train_name, test_name = _register(prompt_coco(tmp_path / "coco"), f"lazy{len(config)}_{tmp_path.name}")
    seen = _record_training_inputs(monkeypatch)
    opts = [
        "model.backbone.net.arch='tiny'", "model.backbone.net.with_cp=False", "model.backbone.square_pad=128",
        "model.roi_heads.num_classes=3", "model.roi_heads.box_head.conv_dims=[32]",
        "model.roi_heads.mask_head.conv_dims=[32]", "model.proposal_generator.post_nms_topk=[50,50]",
        "model.roi_heads.batch_size_per_image=32", *LAZY[config],
        f"dataloader.train.dataset.names='{train_name}'", f"dataloader.test.dataset.names='{test_name}'",
        "dataloader.train.mapper.alpha_source='prompt'", "dataloader.test.mapper.alpha_source='prompt'",
        "dataloader.train.mapper.augmentations.1.target_height=128",
        "dataloader.train.mapper.augmentations.1.target_width=128",
        "dataloader.train.mapper.augmentations.2.crop_size=[128,128]",
        "dataloader.test.mapper.augmentations.0.short_edge_length=96",
        "dataloader.test.mapper.augmentations.0.max_size=128",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "train.init_checkpoint=''", "train.amp.enabled=False",
        "train.device='cpu'", "train.max_iter=2", f"train.output_dir='{tmp_path / 'out'}'",
    ]
    _run_tool(tools / "lazyconfig_train_net.py", ["--config-file", str(ROOT / "configs" / "detectron2" / config),
                                                  *opts], monkeypatch)
    assert len(seen) == 2 and (tmp_path / "out" / "model_final.pth").exists()
    _finite_losses(tmp_path / "out")
    alphas = [x["image"][3].numpy() for _, batch in seen for x in batch]
    assert all(a.ndim == 2 for a in alphas)
    fg = [float((a > 127).mean()) for a in alphas]
    assert any(0 < f < 0.9 for f in fg), fg  # prompts, not the whole image


def test_detectron2_mapper_refuses_a_missing_prompt_unless_it_falls_back(tmp_path):
    _d2_tools()
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T

    from alphaclip_plugins.integrations.detectron2 import AlphaDatasetMapper, hold_out_classes

    data = prompt_coco(tmp_path / "coco")
    train_name, _ = _register(data, f"mapper_{tmp_path.name}")
    dicts = DatasetCatalog.get(train_name)
    assert [d["alpha_prompt"] for d in dicts] == _prompts()
    bare = {k: v for k, v in dicts[0].items() if k != "alpha_prompt"}
    mapper = dict(is_train=False, augmentations=[T.ResizeShortestEdge(64, 1000)], image_format="RGB",
                  alpha_source="prompt")
    with pytest.raises(ValueError, match=r"has no 'alpha_prompt'.*register_alpha_coco_instances.*ALPHA_FALLBACK"):
        AlphaDatasetMapper(**mapper)(bare)
    assert (AlphaDatasetMapper(**mapper, alpha_fallback="whole")(bare)["image"][3] == 255).all()
    _check_alpha(AlphaDatasetMapper(**mapper)(dicts[1])["image"][3].numpy(), 1)
    kept = hold_out_classes(dicts, CLASSES, [NOVEL])
    assert len(kept) == 3 and all(a["category_id"] != 2 for d in kept for a in d["annotations"])
    assert len(hold_out_classes(dicts, CLASSES, [NOVEL], filter_empty=False)) == 4
    assert sum(len(d["annotations"]) for d in dicts) == 10  # the input is untouched
