"""Detectron2: Alpha-CLIP backbone, 4-channel data, checkpoint loading and open vocabulary.

Importing this module registers ``build_alphaclip_vit_backbone`` / ``build_alphaclip_vit_sfp_backbone``
(BACKBONE_REGISTRY), ``AlphaGeneralizedRCNN`` (META_ARCH_REGISTRY) and ``OpenVocabROIHeads``
(ROI_HEADS_REGISTRY). Call :func:`add_alphaclip_config` on a yacs config before merging a config file (or
start from :func:`get_cfg`); train with :class:`AlphaCLIPTrainer` (``train_net`` is its command line).
"""
from .. import require

require("detectron2", "detectron2", "detectron2 is not on PyPI: install it from its source, e.g. "
        "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'")

from .backbone import (  # noqa: E402
    AlphaCLIPViTBackbone, add_alphaclip_config, build_alphaclip_vit_backbone, build_alphaclip_vit_sfp_backbone,
)
from .data import AlphaDatasetMapper, hold_out_classes, load_alpha_coco_json, register_alpha_coco_instances  # noqa: E402,E501
from .lr_decay import get_alphaclip_vit_lr_decay_rate, no_weight_decay_overrides  # noqa: E402
from .meta_arch import AlphaCLIPCheckpointer, AlphaGeneralizedRCNN  # noqa: E402
from .open_vocab import OpenVocabROIHeads, ZeroShotFastRCNNOutputLayers, set_vocabulary  # noqa: E402
from .trainer import AlphaCLIPTrainer, class_subset_dataset, get_cfg  # noqa: E402

__all__ = [
    "AlphaCLIPViTBackbone", "add_alphaclip_config", "build_alphaclip_vit_backbone", "build_alphaclip_vit_sfp_backbone",
    "AlphaDatasetMapper", "AlphaCLIPCheckpointer", "AlphaGeneralizedRCNN", "OpenVocabROIHeads",
    "ZeroShotFastRCNNOutputLayers", "set_vocabulary", "get_alphaclip_vit_lr_decay_rate", "no_weight_decay_overrides",
    "AlphaCLIPTrainer", "get_cfg", "hold_out_classes", "load_alpha_coco_json", "register_alpha_coco_instances",
    "class_subset_dataset",
]
