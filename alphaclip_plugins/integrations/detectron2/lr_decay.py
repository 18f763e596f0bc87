"""Layer-wise lr decay for the Alpha-CLIP backbone through detectron2's ``get_default_optimizer_params``.

detectron2's ``get_vit_lr_decay_rate`` knows its own ViT's names (``.blocks.``, ``.pos_embed``) and returns
1.0 for every parameter of this tower. Use these instead, as ViTDet's configs do::

    optimizer = model_zoo.get_config("common/optim.py").AdamW
    optimizer.params.lr_factor_func = partial(get_alphaclip_vit_lr_decay_rate, lr_decay_rate=0.7, num_layers=12)
    optimizer.params.weight_decay_bias = 0.0
    optimizer.params.overrides = no_weight_decay_overrides()

(``common/optim.py`` already sets ``weight_decay_norm=0``.)
"""
from __future__ import annotations

from typing import Dict

from ...core.vision import VisionTransformer
from ...detection.layer_decay import vit_lr_decay_rate

#: Where ``AlphaCLIPViTBackbone`` keeps the tower inside ``SimpleFeaturePyramid`` (``model.backbone.net``).
TOWER_PREFIX = "backbone.net.visual."


def get_alphaclip_vit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 12,
                                    prefix: str = TOWER_PREFIX) -> float:
    """lr factor of parameter ``name`` of the model (``get_vit_lr_decay_rate``'s contract for this tower):
    ``lr_decay_rate ** (num_layers + 1 - layer_id)``, layer id 0 for the stem (``conv1``, ``conv1_alpha``,
    ``class_embedding``, ``positional_embedding``, ``ln_pre``), ``n + 1`` for ``transformer.resblocks.n``,
    ``num_layers + 1`` (factor 1) for the rest of the model.

    Args:
        prefix: the tower's path in the model; the default fits ``SimpleFeaturePyramid(net=AlphaCLIPViTBackbone)``,
            use ``"backbone.visual."`` for the bare backbone.
    """
    return vit_lr_decay_rate(name, lr_decay_rate, num_layers, prefix)


def no_weight_decay_overrides() -> Dict[str, Dict[str, float]]:
    """``overrides`` for ``get_default_optimizer_params``: no weight decay on the tower's ``no_weight_decay()``
    parameters (class and positional embeddings) and the attention's ``in_proj_bias`` (a bias that
    ``weight_decay_bias`` misses: it matches parameters named ``bias`` only)."""
    names = list(VisionTransformer.NO_WEIGHT_DECAY) + ["in_proj_bias"]
    return {name: {"weight_decay": 0.0} for name in names}
