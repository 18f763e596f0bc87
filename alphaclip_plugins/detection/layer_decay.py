"""Layer-wise learning-rate decay and weight-decay exemptions for the vision tower (framework-free).

A parameter's layer id is 0 for the stem (patch embeddings, class token, positions, ``ln_pre``), ``n + 1``
for block ``n`` and ``num_layers + 1`` for everything else (the tower's ``ln_post``/``proj``, necks, heads);
its lr is ``base_lr * rate ** (num_layers + 1 - layer_id)``, as in ViTDet, BEiT and mmdet's constructor.
The adapters (:mod:`alphaclip_plugins.integrations.detectron2.lr_decay`,
:mod:`alphaclip_plugins.integrations.mmdet.optimizer`) plug these rules into their frameworks.
"""
from __future__ import annotations

from typing import Collection

import torch

#: Top-level tower parameters and modules that form the stem (layer 0), as in the tower's ``group_matcher``.
STEM = ("conv1", "conv1_alpha", "class_embedding", "positional_embedding", "ln_pre")


def vit_layer_id(name: str, num_layers: int, prefix: str) -> int:
    """Layer id of a parameter of the model; ``prefix`` is the tower's path in it (``"backbone.visual."``)."""
    if not name.startswith(prefix):
        return num_layers + 1
    parts = name[len(prefix):].split(".")
    if parts[0] in STEM:
        return 0
    if parts[:2] == ["transformer", "resblocks"]:
        return int(parts[2]) + 1
    return num_layers + 1


def vit_lr_decay_rate(name: str, lr_decay_rate: float, num_layers: int, prefix: str) -> float:
    """The lr factor of a parameter: ``lr_decay_rate ** (num_layers + 1 - layer_id)``."""
    return lr_decay_rate ** (num_layers + 1 - vit_layer_id(name, num_layers, prefix))


def decays(name: str, param: torch.Tensor, no_weight_decay: Collection[str]) -> bool:
    """Whether weight decay applies: not to norms and biases (every 1-D parameter) nor to the names the
    tower's ``no_weight_decay()`` lists (class and positional embeddings), matched on the last name part."""
    return param.ndim > 1 and name.rsplit(".", 1)[-1] not in no_weight_decay
