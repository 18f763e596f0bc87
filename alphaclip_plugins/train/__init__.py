"""Fine-tuning Alpha-CLIP: region-text data, the paper's recipe, one or many processes, exact resume.

``alphaclip train CONFIG.yaml [key=value ...]`` runs :func:`train`; ``torchrun ... -m alphaclip_plugins.train
CONFIG.yaml`` runs it on several processes. Names resolve on first use, so importing this package is cheap.
"""
from __future__ import annotations

from .. import lazy_getattr

_EXPORTS = {
    "train": "trainer", "TrainConfig": "config", "load_config": "config",
    "ContrastiveLoss": "loss", "load_default_model": "default_model", "default_labels": "default_model",
    "SyntheticConfig": "synthetic",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
