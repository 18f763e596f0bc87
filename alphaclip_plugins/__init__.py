"""alphaclip-plugins: Alpha-CLIP, the region-aware CLIP, for the stacks people already use.

``import alphaclip_plugins`` imports no framework (not even torch): names resolve on first use.
Integrations live in ``alphaclip_plugins.integrations.<framework>`` and are imported explicitly.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Dict

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "core.factory", "save_pretrained": "core.factory", "from_pretrained": "core.factory",
    "tokenize": "core.factory",
    "AlphaCLIP": "core.model", "VisionTransformer": "core.vision",
    "CLIPConfig": "core.config", "VisionConfig": "core.config", "TextConfig": "core.config",
    "ARCHITECTURES": "core.config", "get_config": "core.config",
    "load_checkpoint": "core.checkpoint", "export_state_dict": "core.checkpoint",
    "resolve": "core.weights", "read_weights": "core.weights", "LoadReport": "core.weights",
    "save_official": "core.checkpoint", "save_weights": "core.checkpoint", "CheckpointError": "core.io",
    "read_state_dict": "core.io", "to_alphaclip": "core.convert", "from_alphaclip": "core.convert",
    "detect_format": "core.convert",
    "encode_alpha": "core.alpha", "ALPHA_FOREGROUND": "core.alpha", "ALPHA_BACKGROUND": "core.alpha",
    "check_alpha": "core.alpha", "check_alpha_in_forward": "core.alpha",
    "RegionProcessor": "core.processor", "RegionBatch": "core.processor",
    "classify_regions": "core.zeroshot", "text_classifier": "core.zeroshot", "TEMPLATES": "core.zeroshot",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def lazy_getattr(package: str, exports: Dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``exports[name]`` (a submodule of ``package``) on first use."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            namespace[name] = value  # later lookups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__():
    return __all__
