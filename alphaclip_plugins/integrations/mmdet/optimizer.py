"""``AlphaCLIPLayerDecayOptimizerConstructor``: layer-wise lr decay for the Alpha-CLIP backbone in MMDetection.

mmdet's own ``LearningRateDecayOptimizerConstructor`` knows ConvNeXt only; this one reads the same
``paramwise_cfg`` keys and applies the same scaling to ``AlphaCLIPViT``'s blocks::

    optim_wrapper = dict(
        type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.1),
        constructor='AlphaCLIPLayerDecayOptimizerConstructor',
        paramwise_cfg=dict(decay_rate=0.7))  # num_layers: the backbone's, unless given
"""
from __future__ import annotations

from typing import Dict, List

from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.logging import MMLogger
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from ...detection.layer_decay import decays, vit_layer_id

#: Where ``AlphaCLIPViT`` keeps the tower in a detector.
TOWER_PREFIX = "backbone.visual."


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class AlphaCLIPLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """One parameter group per (layer id, decay or not): lr ``base_lr * decay_rate ** (L + 1 - layer_id)``.

    ``paramwise_cfg``: ``decay_rate`` (required), ``num_layers`` (default: the backbone's block count),
    ``decay_type`` (only ``"layer_wise"``). Norms, biases and the tower's ``no_weight_decay()`` parameters
    (class and positional embeddings) get no weight decay; frozen parameters are left out.
    """

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        tower = getattr(getattr(module, "backbone", None), "visual", None)
        if tower is None or not hasattr(tower, "no_weight_decay"):
            raise TypeError(f"{type(self).__name__} needs a detector whose backbone is AlphaCLIPViT "
                            f"(model.backbone.visual); got {type(getattr(module, 'backbone', module)).__name__}")
        cfg = self.paramwise_cfg
        if cfg.get("decay_type", "layer_wise") != "layer_wise" or "decay_rate" not in cfg:
            raise ValueError("paramwise_cfg needs decay_rate and decay_type 'layer_wise' (the default); "
                             f"got {dict(cfg)}")
        num_layers = cfg.get("num_layers", len(tower.transformer.resblocks))
        rate, skip = cfg["decay_rate"], tower.no_weight_decay()
        groups: Dict[str, dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            layer_id = vit_layer_id(name, num_layers, TOWER_PREFIX)
            decay = decays(name, param, skip if name.startswith(TOWER_PREFIX) else ())
            key = f"layer_{layer_id}_{'decay' if decay else 'no_decay'}"
            if key not in groups:
                scale = rate ** (num_layers + 1 - layer_id)
                groups[key] = dict(params=[], param_names=[], group_name=key, lr_scale=scale,
                                   lr=scale * self.base_lr, weight_decay=self.base_wd if decay else 0.0)
            groups[key]["params"].append(param)
            groups[key]["param_names"].append(name)
        MMLogger.get_current_instance().info(
            "layer-wise lr decay groups: " + ", ".join(f"{k} lr={g['lr']:.3g} wd={g['weight_decay']} "
                                                       f"({len(g['params'])})" for k, g in groups.items()))
        params.extend(groups.values())
