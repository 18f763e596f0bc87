"""``AlphaCLIPTrainer``: detectron2's ``DefaultTrainer`` with the package's data, optimizer and checkpointer.

* loaders map with :class:`AlphaDatasetMapper`, so ``INPUT.ALPHA_SOURCE`` / ``INPUT.ALPHA_FALLBACK`` apply;
* the training dicts lose the annotations of ``MODEL.ALPHACLIP.NOVEL_CLASSES`` (the test sets keep them);
* ``SOLVER.OPTIMIZER: "ADAMW"`` builds AdamW with no weight decay on norms, the tower's embeddings and
  ``in_proj_bias`` (``"SGD"``: detectron2's optimizer);
* checkpoints and ``MODEL.WEIGHTS`` go through :class:`AlphaCLIPCheckpointer` (any Alpha-CLIP/CLIP layout).

To use it from a copy of detectron2's ``tools/train_net.py``, add one line after its imports::

    from alphaclip_plugins.integrations.detectron2 import AlphaCLIPTrainer as DefaultTrainer, AlphaCLIPCheckpointer as DetectionCheckpointer, get_cfg  # noqa: E501

or run ``python -m alphaclip_plugins.integrations.detectron2.train_net`` (the same command line).
"""
from __future__ import annotations

import os
import weakref
from typing import Any, Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.config import get_cfg as _detectron2_cfg
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from .backbone import add_alphaclip_config
from .data import AlphaDatasetMapper, hold_out_classes
from .lr_decay import no_weight_decay_overrides
from .meta_arch import AlphaCLIPCheckpointer


def get_cfg() -> CfgNode:
    """detectron2's default config plus the ``MODEL.ALPHACLIP``, ``INPUT.ALPHA_*`` and ``SOLVER.OPTIMIZER`` keys."""
    return add_alphaclip_config(_detectron2_cfg())


def train_dataset_dicts(cfg: CfgNode) -> List[Dict[str, Any]]:
    """The dicts of ``DATASETS.TRAIN`` as detectron2's train loader reads them, without the annotations of
    ``MODEL.ALPHACLIP.NOVEL_CLASSES`` (names of the first dataset's ``thing_classes``)."""
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    novel = list(cfg.MODEL.ALPHACLIP.NOVEL_CLASSES)
    if novel:
        classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes
        dicts = hold_out_classes(dicts, classes, novel, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    return dicts


class AlphaCLIPTrainer(DefaultTrainer):
    """``DefaultTrainer`` for Alpha-CLIP detectors (see the module docstring)."""

    def __init__(self, cfg: CfgNode):
        super().__init__(cfg)
        # DefaultTrainer builds a DetectionCheckpointer; read Alpha-CLIP layouts and save through ours.
        self.checkpointer = AlphaCLIPCheckpointer(self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        for hook in self._hooks:
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_detection_train_loader(cfg, mapper=AlphaDatasetMapper(cfg, True), dataset=train_dataset_dicts(cfg))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(cfg, dataset_name, mapper=AlphaDatasetMapper(cfg, False))

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        name = cfg.SOLVER.OPTIMIZER.upper()
        if name == "SGD":
            return super().build_optimizer(cfg, model)
        if name != "ADAMW":
            raise ValueError(f"SOLVER.OPTIMIZER must be 'SGD' or 'ADAMW'; got {cfg.SOLVER.OPTIMIZER!r}")
        params = get_default_optimizer_params(
            model, base_lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM, bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS, overrides=no_weight_decay_overrides(),
        )
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(params, lr=cfg.SOLVER.BASE_LR)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str = None):
        return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
