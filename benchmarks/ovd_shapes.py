"""Open-vocabulary detection on CPU: base-class training, novel-class AP, with and without Alpha-CLIP re-scoring.

    nice -n 5 python benchmarks/ovd_shapes.py     # prints a Markdown table; reuses a finished training

The world is the embedded model's (``alphaclip_plugins/assets/tiny-shapes``): 20 classes, colour x shape.
Five of them are *novel*, one per colour and each sharing its shape with base classes (``NOVEL``); the
other 15 are *base*. Scenes are :func:`alphaclip_plugins.train.scenes.draw_scene` images (128 x 96, 2-5
textured shapes of 20-45 % of the short side, boxes and masks) written as COCO instance files:

* ``train.json``: base categories only; novel shapes are still drawn in the images but not annotated
  (the hold-out lives in this experiment's own data);
* ``val_base.json`` / ``val_novel.json``: the same held-out images, annotated with base / novel classes
  only, all 20 categories listed, so that mmdet's ``CocoMetric`` averages AP over one group while the
  detector predicts over all 20 (the generalised setting).

The detector is ``configs/mmdet/ov-faster-rcnn_alphaclip-vit-b16_sfp_1x_coco.py`` with config overrides:
the embedded model's vision tower as the backbone (fine-tuned at the config's lr x 0.1; ``--frozen`` keeps
it frozen), patch 8, a stride-8 map, pyramid strides 4-64, 16 px anchors, small heads, its classifier the
embedded model's text embeddings of the 15 base names. It trains through mmdet's own ``tools/train.py``. The checkpoint then gets the 20-class vocabulary
(``integrations.mmdet.set_vocabulary``) and each row is one ``tools/test.py`` run with ``CocoMetric``:

* no re-scoring: the zero-shot classifier alone;
* crop re-scoring: each box cropped and seen whole by the embedded model (the usual CLIP approach);
* Alpha-CLIP re-scoring: the whole image with each box as alpha, same model, same fusion.

Both re-scoring rows score the head's best ``--rescore-topk`` (1000) (box, class) pairs per image, so every
class of each kept box is re-scored (as ViLD does); the fused scores are then thresholded (0.05) and cut
(100 per image) as the config's ``test_cfg`` says.

Everything is synthetic and tiny (a 4-block, width-64 ViT; ~12 minutes of CPU training for the scorer);
the numbers show the mechanism, not what a B/16 detector reaches on LVIS or COCO.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "mmdet" / "ov-faster-rcnn_alphaclip-vit-b16_sfp_1x_coco.py"
#: one novel class per colour; each shape is novel for at most two colours, so it is seen in base ones
NOVEL = ("red circle", "green square", "blue triangle", "yellow cross", "purple circle")
SIZE = (128, 96)  # width, height of every image (the embedded model's "non-square" condition)


def write_split(root: Path, name: str, count: int, seed: int, groups: Dict[str, Sequence[str]]) -> Dict[str, Path]:
    """Draw ``count`` scenes into ``root/name/`` and write one COCO file per entry of ``groups``
    (file stem -> the classes annotated there; its categories are those classes, or all if it has none)."""
    from alphaclip_plugins.train.scenes import draw_scene
    from alphaclip_plugins.train.synthetic import SceneConfig, labels

    names = labels()
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    images, shapes = [], []
    for i in range(count):
        scene = draw_scene(rng, SceneConfig(min_frac=0.2, overlap=0.0), size=SIZE)
        scene.image.save(root / name / f"{i}.png")
        images.append(dict(id=i + 1, file_name=f"{i}.png", width=SIZE[0], height=SIZE[1]))
        shapes += [(i + 1, s, m) for s, m in zip(scene.shapes, scene.masks)]
    out = {}
    for stem, keep in groups.items():
        anns = []
        for image_id, s, m in shapes:
            if s.label not in keep:
                continue
            x0, y0, x1, y1 = s.box
            anns.append(dict(id=len(anns) + 1, image_id=image_id, category_id=names.index(s.label) + 1,
                             bbox=[x0, y0, x1 - x0, y1 - y0], area=int(m.sum()), segmentation=[s.polygon],
                             iscrowd=0))
        cats = [dict(id=k + 1, name=n) for k, n in enumerate(names) if stem.startswith("val") or n in keep]
        out[stem] = root / f"{stem}.json"
        out[stem].write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return out


def _dataset(cfg, root: Path, ann: Path, split: str, classes: Sequence[str], pipeline) -> None:
    cfg.dataset.update(data_root=str(root), ann_file=ann.name, data_prefix=dict(img=f"{split}/"),
                       metainfo=dict(classes=tuple(classes)), pipeline=pipeline)


def configs(work: Path, files: Dict[str, Path], base: List[str], names: List[str], iters: int, batch: int,
            frozen: bool = False, logit_scale: float = 50.0, topk: int = 1000) -> tuple:
    """The shipped OV config with the tiny-backbone overrides: ``(train config, test config)`` paths."""
    from mmengine.config import Config, ConfigDict

    from alphaclip_plugins.core.factory import DEFAULT_MODEL_DIR

    cfg = Config.fromfile(str(CONFIG))
    arch = json.loads((DEFAULT_MODEL_DIR / "alphaclip_config.json").read_text())["config"]["vision"]
    m = cfg.model
    # the tower fine-tunes (lr x 0.1, the config's) unless frozen: the scorer is a separate frozen copy
    m.backbone.update(arch="tiny", frozen=frozen, init_cfg=dict(type="Pretrained", checkpoint=str(DEFAULT_MODEL_DIR)),
                      **{k: arch[k] for k in ("image_size", "layers", "heads", "embed_dim")})
    # a stride-8 map (patch 8): strides 4, 8, 16 from it, 32 and 64 pooled, as the RPN's anchors expect
    m.neck.update(in_channels=arch["width"], out_channels=64, scale_factors=(2.0, 1.0, 0.5), in_stride=8)
    m.rpn_head.update(in_channels=64, feat_channels=64)
    m.rpn_head.anchor_generator.scales = [4]  # anchors of 16-256 px: the shapes are 19-43 px
    m.roi_head.bbox_roi_extractor.update(out_channels=64, roi_layer=dict(type="RoIAlign", output_size=7,
                                                                         sampling_ratio=2))
    # a few shapes per image: fewer proposals and sampled RoIs than COCO's defaults (RoIAlign dominates on CPU)
    m.train_cfg.rpn_proposal.update(nms_pre=600, max_per_img=300)
    m.train_cfg.rcnn.sampler.num = 128
    m.test_cfg.rpn.update(nms_pre=600, max_per_img=300)
    head = m.roi_head.bbox_head
    head.update(in_channels=64, fc_out_channels=256, num_classes=len(base))
    head.cls_predictor_cfg.update(text_embeddings=str(work / "text_base.safetensors"), class_names=base,
                                  clip="default", logit_scale=logit_scale)
    m.region_scorer = None  # the scorer is frozen and plays no part in training
    for t in cfg.train_pipeline + cfg.test_pipeline:
        if t.type == "Resize":
            t.scale = SIZE
    cfg.train_dataloader.update(batch_size=batch, num_workers=0, persistent_workers=False)
    _dataset(cfg.train_dataloader, work, files["train"], "train", base, cfg.train_pipeline)
    cfg.train_dataloader.dataset.filter_cfg = dict(filter_empty_gt=True, min_size=4)
    cfg.optim_wrapper.optimizer.lr = 1e-3  # heads from scratch, a short schedule
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters + 1)
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=100),
                           dict(type="MultiStepLR", by_epoch=False, begin=0, end=iters, milestones=[int(iters * 0.8)])]
    for key in ("val_dataloader", "val_cfg", "val_evaluator", "test_dataloader", "test_cfg", "test_evaluator"):
        cfg[key] = None
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=25)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=iters)
    cfg.log_processor = dict(by_epoch=False)
    cfg.dump(str(work / "train_cfg.py"))

    test = Config.fromfile(str(work / "train_cfg.py"))
    head = test.model.roi_head.bbox_head
    head.num_classes = len(names)
    head.cls_predictor_cfg.update(text_embeddings=str(work / "text_all.safetensors"), class_names=names)
    test.model.region_scorer = dict(type="AlphaCLIPRegionScorer", labels=names, clip="default", novel_classes=NOVEL,
                                    alpha_base=0.35, beta_novel=0.65, topk=topk, mode="alpha")
    loader = dict(batch_size=4, num_workers=0, persistent_workers=False, drop_last=False,
                  sampler=dict(type="DefaultSampler", shuffle=False), dataset=dict(type="CocoDataset", test_mode=True))
    test.test_dataloader = ConfigDict(loader)
    _dataset(test.test_dataloader, work, files["val_novel"], "val", names, cfg.test_pipeline)
    test.test_evaluator = [dict(type="CocoMetric", ann_file=str(files[f"val_{g}"]), metric="bbox", prefix=g)
                           for g in ("novel", "base")]
    test.test_cfg = dict(type="TestLoop")
    test.dump(str(work / "test_cfg.py"))
    return work / "train_cfg.py", work / "test_cfg.py"


def serve_all_classes(train_cfg: Path, ckpt: Path, names: List[str], out: Path) -> Path:
    """The trained (base-vocabulary) checkpoint with the 20-class vocabulary swapped in."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint, save_checkpoint

    from alphaclip_plugins.core.factory import resolve_model
    from alphaclip_plugins.core.zeroshot import save_text_embeddings
    from alphaclip_plugins.integrations.mmdet import set_vocabulary

    init_default_scope("mmdet")
    model = MODELS.build(Config.fromfile(str(train_cfg)).model)
    load_checkpoint(model, str(ckpt), map_location="cpu", strict=True)
    vocab = out.parent / "text_all.safetensors"
    if not vocab.exists():
        save_text_embeddings(resolve_model("default"), names, vocab)
    set_vocabulary(model, vocab, NOVEL)
    save_checkpoint(dict(state_dict=model.state_dict(), meta=dict(dataset_meta=dict(classes=tuple(names)))), str(out))
    return out


def _tool(name: str, *args: str, env: dict) -> str:
    import mmdet

    script = Path(mmdet.__file__).parent / ".mim" / "tools" / f"{name}.py"
    run = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise SystemExit(f"tools/{name}.py failed (exit {run.returncode}):\n{log[-4000:]}")
    return log


def metrics(log: str) -> Dict[str, float]:
    """``{"novel/bbox_mAP": ..., "base/bbox_mAP_50": ...}`` from ``tools/test.py``'s final metric line."""
    found = dict((k, float(v)) for k, v in re.findall(r"((?:novel|base)/bbox_mAP(?:_50)?):\s*([-0-9.]+)", log))
    if "novel/bbox_mAP" not in found or "testing results of the whole dataset is empty" in log:
        raise SystemExit(f"no COCO metrics in tools/test.py's log:\n{log[-4000:]}")
    return found


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", default="work_dirs/ovd_shapes")
    p.add_argument("--train-images", type=int, default=400)
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--iters", type=int, default=800)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rescore-topk", type=int, default=1000,
                   help="(box, class) detections per image re-scored: every class of each box, as ViLD does")
    p.add_argument("--frozen", action="store_true", help="freeze the backbone (F-VLM); default: fine-tune it")
    p.add_argument("--logit-scale", type=float, default=50.0, help="the zero-shot classifier's inverse temperature")
    a = p.parse_args(argv)
    from alphaclip_plugins.train.synthetic import labels

    work = Path(a.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = labels()
    base = [n for n in names if n not in NOVEL]
    t0 = time.time()
    files = write_split(work, "train", a.train_images, 2000, {"train": base})
    files.update(write_split(work, "val", a.val_images, 3000, {"val_novel": NOVEL, "val_base": base}))
    train_cfg, test_cfg = configs(work, files, base, names, a.iters, a.batch, a.frozen,
                                   a.logit_scale, a.rescore_topk)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(a.threads))
    trained = work / "train_run" / f"iter_{a.iters}.pth"
    t_train = None
    if not trained.exists():  # the data are drawn from fixed seeds: a finished training is reused
        _tool("train", str(train_cfg), "--work-dir", str(work / "train_run"), env=env)
        t_train = time.time() - t0
    ckpt = serve_all_classes(train_cfg, trained, names, work / "all_classes.pth")
    rows = [("no re-scoring", ["model.region_scorer=None"]),
            ("crop re-scoring (box cropped, whole-image alpha)", ["model.region_scorer.mode=crop"]),
            ("Alpha-CLIP re-scoring (whole image, box as alpha)", ["model.region_scorer.mode=alpha"])]
    table = ["| re-scoring | novel AP | novel AP50 | base AP | base AP50 |", "| --- | --- | --- | --- | --- |"]
    for title, options in rows:
        m = metrics(_tool("test", str(test_cfg), str(ckpt), "--work-dir", str(work / "test_run"), "--cfg-options",
                          *options, env=env))
        table.append(f"| {title} | " + " | ".join(f"{100 * m[f'{g}/bbox_mAP{s}']:.1f}" for g in ("novel", "base")
                                                  for s in ("", "_50")) + " |")
    print(f"{a.train_images} training images ({len(base)} base classes annotated), {a.val_images} held-out images, "
          f"{a.iters} iterations of batch {a.batch}; novel: {', '.join(NOVEL)}; "
          + (f"data and training {t_train:.0f} s, " if t_train else f"training reused from {work}, ")
          + f"total {time.time() - t0:.0f} s\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
