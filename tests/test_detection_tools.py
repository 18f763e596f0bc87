"""Every detection config through its framework's own tools, as a detection engineer runs them.

MMDetection: ``tools/train.py`` (shipped in the mmdet wheel, ``mmdet/.mim/tools``) trains each config in
``configs/mmdet/`` for a few iterations on the tiny synthetic COCO set (tiny architecture through config
overrides), ``tools/test.py`` evaluates the checkpoint it wrote with ``CocoMetric``, and a 2-process gloo
run (``--launcher pytorch``) trains each config under DDP. Detectron2 (not on PyPI: skipped where it is
not installed): ``tools/train_net.py`` (yacs configs) and ``tools/lazyconfig_train_net.py`` (LazyConfigs)
from its source tree train and evaluate, with the tiny set registered by ``tests/d2_tool_launch.py``, on 1
process and (``--num-gpus 2``, detectron2's ``launch``) on 2 gloo processes.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from coco_files import CLASSES, synthetic_coco
from conftest import import_or_skip

ROOT = Path(__file__).resolve().parent.parent
MMDET_CONFIGS = sorted(p.name for p in (ROOT / "configs" / "mmdet").glob("*.py"))
ITERS = 4


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_tool(script: Path, *args: str, nproc: int = 1, timeout: int = 600, **extra_env: str) -> str:
    """Run a framework's script in a fresh process (``nproc`` > 1: under ``torch.distributed.run`` on CPU);
    returns its log, after asserting that it exited cleanly."""
    env = dict(os.environ, **extra_env, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # checkpoints must load under torch's default
    cmd = [sys.executable, str(script), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               _port(), str(ROOT / "tests" / "cpu_dist_launch.py"), str(script), *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    log = f"exit status {run.returncode}\n{run.stdout[-4000:]}\n{run.stderr[-6000:]}"
    assert run.returncode == 0, log
    return run.stdout + run.stderr


# --- MMDetection ------------------------------------------------------------------------------------------------
def _datasets(loader) -> list:
    """The innermost dataset configs of a dataloader (wrappers such as RepeatDataset hold one in ``dataset``)."""
    ds = loader.dataset
    while "dataset" in ds:
        ds = ds.dataset
    return [ds]


def mmdet_tiny_config(name: str, data: Path, work: Path):
    """``configs/mmdet/<name>`` shrunk to a tiny tower, the tiny COCO set, ``ITERS`` iterations, gloo for DDP."""
    from mmengine.config import Config

    from test_mmdet import _tiny
    from test_vitdet import _mmdet_tiny_cfg

    if "vitdet" in name:
        cfg = _mmdet_tiny_cfg(data)
    else:
        cfg = _tiny(Config.fromfile(str(ROOT / "configs" / "mmdet" / name)))
    roi = cfg.model.roi_head
    roi.bbox_head.num_classes = len(CLASSES)
    if "mask_head" in roi:
        roi.mask_head.num_classes = len(CLASSES)
    if "cls_predictor_cfg" in roi.bbox_head:  # open vocabulary: the embedded model names the classes
        roi.bbox_head.cls_predictor_cfg.update(text_embeddings=str(work / "text.safetensors"),
                                               class_names=list(CLASSES), clip="default")
        cfg.model.region_scorer.update(labels=list(CLASSES), clip="default", novel_classes=[])
    metrics = ["bbox", "segm"] if "mask_head" in roi else ["bbox"]
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg[key]
        loader.update(batch_size=2, num_workers=0, persistent_workers=False)
        for ds in _datasets(loader):
            ds.update(data_root=str(data.parent), ann_file=data.name, data_prefix=dict(img="img/"),
                      metainfo=dict(classes=CLASSES))
            for t in ds.pipeline:
                if t.type == "Resize":  # the ViTDet config's jitter (RandomResize) is shrunk by _mmdet_tiny_cfg
                    t.scale = (128, 128)
    _datasets(cfg.train_dataloader)[0].filter_cfg = dict(filter_empty_gt=True, min_size=8)
    cfg.val_evaluator = cfg.test_evaluator = dict(type="CocoMetric", ann_file=str(data), metric=metrics)
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=ITERS, val_interval=ITERS)
    cfg.param_scheduler = []
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=ITERS)
    cfg.log_processor = dict(by_epoch=False)
    cfg.env_cfg.dist_cfg = dict(backend="gloo")
    cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)  # CPU modules
    path = work / name
    cfg.dump(str(path))
    return path


def _mmdet_tool(name: str) -> Path:
    import mmdet

    return Path(mmdet.__file__).parent / ".mim" / "tools" / f"{name}.py"


def _losses(work: Path) -> List[float]:
    (scalars,) = work.glob("*/vis_data/scalars.json")
    return [json.loads(line)["loss"] for line in scalars.read_text().splitlines() if '"loss"' in line]


def _coco_lines(log: str, metrics: List[str]) -> None:
    assert "testing results of the whole dataset is empty" not in log, log[-3000:]
    for metric in metrics:
        assert f"{metric}_mAP_copypaste" in log, log[-3000:]


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return synthetic_coco(tmp_path_factory.mktemp("coco"))


@pytest.mark.parametrize("name", MMDET_CONFIGS)
def test_mmdet_config_trains_on_two_processes_and_tests_with_mmdets_own_tools(name, coco, tmp_path):
    """``tools/train.py --launcher pytorch`` on 2 gloo processes (validating at its last iteration), then
    ``tools/test.py`` on the checkpoint it wrote: both print real COCO metrics."""
    import_or_skip("mmdet")
    import_or_skip("mmcv.ops")
    cfg = mmdet_tiny_config(name, coco, tmp_path)
    log = run_tool(_mmdet_tool("train"), str(cfg), "--launcher", "pytorch", "--work-dir", str(tmp_path / "work"),
                   nproc=2)
    assert "Expected to have finished reduction" not in log
    losses = _losses(tmp_path / "work")
    assert len(losses) == ITERS and all(math.isfinite(v) for v in losses), f"losses {losses}\n{log[-3000:]}"
    metrics = ["bbox", "segm"] if "mask" in name else ["bbox"]
    _coco_lines(log, metrics)  # the validation after the last iteration
    ckpt = tmp_path / "work" / f"iter_{ITERS}.pth"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not [k for k in saved if k.startswith("region_scorer.")]  # the frozen scorer is outside DDP and ckpts
    if "ov-" in name:
        assert "roi_head.bbox_head.fc_cls.text_embeddings" in saved
    log = run_tool(_mmdet_tool("test"), str(cfg), str(ckpt), "--work-dir", str(tmp_path / "test"))
    _coco_lines(log, metrics)


def test_mmdet_open_vocab_config_datasets_name_the_heads_classes():
    """Labels of the head index its own classes in the datasets and the evaluator (not COCO's 80)."""
    import_or_skip("mmdet")
    from mmdet.registry import DATASETS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    cfg = Config.fromfile(str(ROOT / "configs" / "mmdet" / "ov-faster-rcnn_alphaclip-vit-b16_sfp_1x_coco.py"))
    head = tuple(cfg.model.roi_head.bbox_head.cls_predictor_cfg.class_names)
    assert cfg.model.roi_head.bbox_head.num_classes == len(head)
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        dataset = DATASETS.build(dict(cfg[key].dataset, lazy_init=True))
        assert dataset.metainfo["classes"] == head, key


# --- Detectron2 (from its source tree: its tools are not installed with it) -------------------------------------
D2_YACS = ["faster_rcnn_alphaclip_vit_b16_sfp.yaml", "ov_faster_rcnn_alphaclip_vit_b16_sfp.yaml"]
D2_LAZY = ["mask_rcnn_alphaclip_vit_b16_sfp_lazy.py", "mask_rcnn_alphaclip_vit_b16_vitdet_lsj_100ep.py"]


def _d2_tools() -> Path:
    d2 = import_or_skip("detectron2", allow_missing=True)  # not on PyPI: skips even under CI
    tools = Path(d2.__file__).resolve().parent.parent / "tools"
    if not (tools / "train_net.py").exists():
        pytest.skip(f"detectron2 is installed without its source tree's tools/ (looked in {tools})")
    return tools


def _d2_run(script: Path, coco: Path, *args: str, nproc: int = 1) -> str:
    """``script`` through ``tests/d2_tool_launch.py``; ``nproc`` > 1: ``--num-gpus nproc``, which detectron2's
    ``launch`` runs as that many gloo processes on CPU."""
    args = ("--num-gpus", str(nproc), *args) if nproc > 1 else args
    return run_tool(ROOT / "tests" / "d2_tool_launch.py", str(script), *args,
                    ALPHACLIP_TEST_COCO=f"alphaclip_tools_coco,{coco},{coco.parent / 'img'}")


def _d2_results(log: str) -> None:
    assert "copypaste: Task: bbox" in log, log[-3000:]


def _d2_ranks(out: Path, log: str, nproc: int) -> None:
    """Every rank of ``nproc`` processes ran: rank 0 logs to the output, the others to ``log.txt.rank<i>``."""
    assert f"World size: {nproc}" in log, log[-3000:]
    for rank in range(1, nproc):
        assert f"Rank of current process: {rank}. World size: {nproc}" in (out / f"log.txt.rank{rank}").read_text()
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert state and not [k for k in state if k.startswith(("module.", "rescorer."))]  # no DDP prefix, no scorer


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("name", D2_YACS)
def test_detectron2_yacs_config_trains_and_evaluates_with_train_net(name, nproc, coco, tmp_path):
    """The README's hook line in ``tools/train_net.py``; ``nproc`` 2: DDP on 2 gloo processes."""
    tools = _d2_tools()
    from test_detectron2 import _yacs

    cfg = _yacs(name)
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ("alphaclip_tools_coco",)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(CLASSES)
    if cfg.MODEL.ALPHACLIP.RESCORE:
        cfg.MODEL.ALPHACLIP.update(TEXT_EMBEDDINGS=str(tmp_path / "text.safetensors"), CLASS_NAMES=list(CLASSES),
                                   CLIP="default", NOVEL_CLASSES=[])
    cfg.INPUT.update(MIN_SIZE_TRAIN=(96,), MAX_SIZE_TRAIN=128, MIN_SIZE_TEST=96, MAX_SIZE_TEST=128)
    cfg.SOLVER.update(IMS_PER_BATCH=2, MAX_ITER=ITERS, STEPS=(), WARMUP_ITERS=0, CHECKPOINT_PERIOD=ITERS)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    (tmp_path / "cfg.yaml").write_text(cfg.dump())
    log = _d2_run(tools / "train_net.py", coco, "--config-file", str(tmp_path / "cfg.yaml"), nproc=nproc)
    _d2_results(log)  # evaluated after training (DefaultTrainer's EvalHook)
    _d2_ranks(tmp_path / "out", log, nproc)
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.json").read_text().splitlines()]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert len(losses) >= 1 and all(math.isfinite(v) for v in losses), metrics
    if nproc > 1:
        return  # the checkpoint is the 1-process one's; --eval-only is tested there
    log = _d2_run(tools / "train_net.py", coco, "--config-file", str(tmp_path / "cfg.yaml"), "--eval-only",
                  "MODEL.WEIGHTS", str(tmp_path / "out" / "model_final.pth"))
    _d2_results(log)


LAZY_TINY = '''
from functools import partial

from detectron2.config import LazyConfig

from alphaclip_plugins.integrations.detectron2 import get_alphaclip_vit_lr_decay_rate

_c = LazyConfig.load({path!r})
_c.model.backbone.net.update(arch="tiny", patch_size=14, image_size=28, layers=3, window_size=2,
                             global_blocks=(1,), with_cp=False)
_c.model.backbone.square_pad = 128
_c.model.roi_heads.num_classes = {classes}
_c.model.roi_heads.box_head.conv_dims = [32]
_c.model.roi_heads.mask_head.conv_dims = [32]
_c.model.proposal_generator.post_nms_topk = (50, 50)
_c.model.roi_heads.batch_size_per_image = 32
_c.optimizer.params.lr_factor_func = partial(get_alphaclip_vit_lr_decay_rate, lr_decay_rate=0.7, num_layers=3)
_c.dataloader.train.dataset.names = _c.dataloader.test.dataset.names = "alphaclip_tools_coco"
_c.dataloader.train.total_batch_size, _c.dataloader.train.num_workers = 2, 0
_c.dataloader.test.num_workers = 0
_resize, _crop = _c.dataloader.train.mapper.augmentations[1:]
_resize.target_height = _resize.target_width = 128
_crop.crop_size = (128, 128)
_c.dataloader.test.mapper.augmentations[0].short_edge_length = 96
_c.dataloader.test.mapper.augmentations[0].max_size = 128
_c.train.update(output_dir={out!r}, device="cpu", max_iter={iters}, init_checkpoint="", eval_period=0)
_c.train.amp.enabled = False
_c.train.checkpointer.period = {iters}
model, dataloader, optimizer, lr_multiplier, train = (_c.model, _c.dataloader, _c.optimizer, _c.lr_multiplier,
                                                      _c.train)
'''


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("name", D2_LAZY)
def test_detectron2_lazy_config_trains_and_evaluates_with_lazyconfig_train_net(name, nproc, coco, tmp_path):
    """``tools/lazyconfig_train_net.py`` as it is; ``nproc`` 2: DDP (the config's ``train.ddp``) on 2 gloo
    processes."""
    tools = _d2_tools()
    cfg = tmp_path / "tiny_lazy.py"
    cfg.write_text(LAZY_TINY.format(path=str(ROOT / "configs" / "detectron2" / name), classes=len(CLASSES),
                                    out=str(tmp_path / "out"), iters=ITERS))
    log = _d2_run(tools / "lazyconfig_train_net.py", coco, "--config-file", str(cfg), nproc=nproc)
    _d2_results(log)
    _d2_ranks(tmp_path / "out", log, nproc)
    if nproc > 1:
        return  # the checkpoint is the 1-process one's; --eval-only is tested there
    log = _d2_run(tools / "lazyconfig_train_net.py", coco, "--config-file", str(cfg), "--eval-only",
                  f"train.init_checkpoint={tmp_path / 'out' / 'model_final.pth'}")
    _d2_results(log)
