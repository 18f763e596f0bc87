"""``AlphaCLIPTrainer``: detectron2's ``DefaultTrainer`` with the package's data, optimizer and checkpointer.

* loaders map with :class:`AlphaDatasetMapper`, so ``INPUT.ALPHA_SOURCE`` / ``INPUT.ALPHA_FALLBACK`` apply;
* with ``MODEL.ALPHACLIP.CLASS_NAMES``, every dataset of ``DATASETS.TRAIN`` / ``DATASETS.TEST`` is read as
  :func:`class_subset_dataset` of those names: other classes' annotations are dropped, ``category_id`` is the
  index in ``CLASS_NAMES``, and the COCO evaluator scores those classes under their dataset ids;
* the training dicts lose the annotations of ``MODEL.ALPHACLIP.NOVEL_CLASSES`` (the test sets keep them);
* ``SOLVER.OPTIMIZER: "ADAMW"`` builds AdamW with no weight decay on norms, the tower's embeddings and
  ``in_proj_bias`` (``"SGD"``: detectron2's optimizer);
* checkpoints and ``MODEL.WEIGHTS`` go through :class:`AlphaCLIPCheckpointer` (any Alpha-CLIP/CLIP layout);
* on several processes, DDP gets ``device_ids=[local rank]`` only for a CUDA model (gloo on CPU: none, which
  ``DistributedDataParallel`` requires there); the frozen re-scorer is no submodule, so it stays out of DDP.

To use it from a copy of detectron2's ``tools/train_net.py``, add one line after its imports::

    from alphaclip_plugins.integrations.detectron2 import AlphaCLIPTrainer as DefaultTrainer, AlphaCLIPCheckpointer as DetectionCheckpointer, get_cfg  # noqa: E501

or run ``python -m alphaclip_plugins.integrations.detectron2.train_net`` (the same command line).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from typing import Any, Dict, List, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.config import get_cfg as _detectron2_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, defaults, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from .backbone import add_alphaclip_config
from .data import AlphaDatasetMapper, hold_out_classes
from .lr_decay import no_weight_decay_overrides
from .meta_arch import AlphaCLIPCheckpointer


def get_cfg() -> CfgNode:
    """detectron2's default config plus the ``MODEL.ALPHACLIP``, ``INPUT.ALPHA_*`` and ``SOLVER.OPTIMIZER`` keys."""
    return add_alphaclip_config(_detectron2_cfg())


def _select(dataset_dict: Dict[str, Any], new_ids: Dict[int, int]) -> Dict[str, Any]:
    """``dataset_dict`` with the annotations of the ``new_ids`` keys only, relabelled to their values."""
    if "annotations" not in dataset_dict:
        return dataset_dict
    annotations = [{**a, "category_id": new_ids[a["category_id"]]} for a in dataset_dict["annotations"]
                   if a["category_id"] in new_ids]
    return {**dataset_dict, "annotations": annotations}


def class_subset_dataset(name: str, class_names: Sequence[str]) -> str:
    """The name of a registered dataset that is dataset ``name`` restricted to ``class_names``, in their order.

    Its dicts keep every image but only the annotations of ``class_names``, whose ``category_id`` becomes the
    index in ``class_names``. Its metadata agrees: ``thing_classes`` is ``class_names``,
    ``thing_dataset_id_to_contiguous_id`` maps the original dataset ids to those indices (so COCO results keep
    the dataset's ids), and it has no ``json_file``, so ``COCOEvaluator`` converts the derived dicts and its
    ground truth and AP table hold exactly these classes. The derived name is registered once per process.

    Returns:
        ``name`` itself when its ``thing_classes`` already are ``class_names``, else
        ``"<name>_alphaclip_<K>cls_<hash>"``.

    Raises:
        ValueError: a name of ``class_names`` that the dataset does not have, or a repeated name.
    """
    class_names = list(class_names)
    if not MetadataCatalog.get(name).get("thing_classes"):
        DatasetCatalog.get(name)  # register_coco_instances sets thing_classes when it first loads the json
    meta = MetadataCatalog.get(name)
    classes = list(meta.get("thing_classes") or [])
    if classes == class_names:
        return name
    missing = [c for c in class_names if c not in classes]
    if missing or len(set(class_names)) != len(class_names):
        what = f"{missing} are not classes of" if missing else "repeat names; each must name one class of"
        raise ValueError(f"MODEL.ALPHACLIP.CLASS_NAMES {what} dataset {name!r}, whose thing_classes are {classes}; "
                         f"fix CLASS_NAMES or pick datasets that have these classes")
    digest = hashlib.sha1("\n".join(class_names).encode()).hexdigest()[:8]
    derived = f"{name}_alphaclip_{len(class_names)}cls_{digest}"
    if derived in DatasetCatalog:
        return derived
    new_ids = {classes.index(c): k for k, c in enumerate(class_names)}  # the dataset's contiguous id -> ours
    DatasetCatalog.register(derived, lambda: [_select(d, new_ids) for d in DatasetCatalog.get(name)])
    fields = {k: v for k, v in meta.as_dict().items() if k not in (
        "name", "json_file", "thing_classes", "thing_colors", "thing_dataset_id_to_contiguous_id")}
    if meta.get("thing_dataset_id_to_contiguous_id"):
        dataset_id = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        fields["thing_dataset_id_to_contiguous_id"] = {dataset_id[old]: new for old, new in new_ids.items()}
    if meta.get("thing_colors"):
        fields["thing_colors"] = [meta.thing_colors[classes.index(c)] for c in class_names]
    MetadataCatalog.get(derived).set(thing_classes=class_names, **fields)
    return derived


def config_datasets(cfg: CfgNode, names: Sequence[str]) -> List[str]:
    """``names`` (``DATASETS.TRAIN`` or ``.TEST``) as the model sees them: their :func:`class_subset_dataset`
    of ``MODEL.ALPHACLIP.CLASS_NAMES`` when the config names classes, else unchanged."""
    class_names = list(cfg.MODEL.ALPHACLIP.CLASS_NAMES)
    return [class_subset_dataset(n, class_names) for n in names] if class_names else list(names)


def train_dataset_dicts(cfg: CfgNode) -> List[Dict[str, Any]]:
    """The dicts of ``DATASETS.TRAIN`` as detectron2's train loader reads them (restricted to
    ``MODEL.ALPHACLIP.CLASS_NAMES`` when set), without the annotations of ``MODEL.ALPHACLIP.NOVEL_CLASSES``."""
    names = config_datasets(cfg, cfg.DATASETS.TRAIN)
    dicts = get_detection_dataset_dicts(
        names, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    novel = list(cfg.MODEL.ALPHACLIP.NOVEL_CLASSES)
    if novel:
        classes = MetadataCatalog.get(names[0]).thing_classes
        dicts = hold_out_classes(dicts, classes, novel, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    return dicts


_create_ddp_model = defaults.create_ddp_model


def create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """detectron2's ``create_ddp_model``, whose default ``device_ids=[local rank]`` applies to CUDA models only:
    a CPU model (gloo) gets ``device_ids=None``, the one value ``DistributedDataParallel`` takes for it."""
    param = next(model.parameters(), None)
    if "device_ids" not in kwargs and (param is None or param.device.type != "cuda"):
        kwargs["device_ids"] = None
    return _create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def _ddp_on_any_device():
    """``DefaultTrainer.__init__`` wraps the model with :func:`create_ddp_model` while this is active."""
    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = _create_ddp_model


class AlphaCLIPTrainer(DefaultTrainer):
    """``DefaultTrainer`` for Alpha-CLIP detectors (see the module docstring)."""

    def __init__(self, cfg: CfgNode):
        with _ddp_on_any_device():
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
        (dataset_name,) = config_datasets(cfg, [dataset_name])
        return build_detection_test_loader(cfg, dataset_name, mapper=AlphaDatasetMapper(cfg, False))

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None):
        """``DefaultTrainer.test`` on the datasets of :func:`config_datasets`, so that a subclass's own
        ``build_evaluator`` (``tools/train_net.py``'s) also gets the class-restricted names."""
        names = config_datasets(cfg, cfg.DATASETS.TEST)
        if names != list(cfg.DATASETS.TEST):
            cfg = cfg.clone()
            cfg.defrost()
            cfg.DATASETS.TEST = tuple(names)
            cfg.freeze()
        return super().test(cfg, model, evaluators)

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
        (dataset_name,) = config_datasets(cfg, [dataset_name])
        return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
