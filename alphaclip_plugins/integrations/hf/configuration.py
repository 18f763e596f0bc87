"""Configs of the Hugging Face Alpha-CLIP models: CLIP's configs under their own ``model_type``.

The fields are CLIP's; only the ``model_type`` differs, so that ``AutoModel`` builds the alpha-aware
classes and a saved ``config.json`` says what the weights are. A stock CLIP ``config.json`` loads
into these classes unchanged.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

from .compat import PretrainedConfig, builds_sub_configs

#: Keys of a serialised config that describe the file rather than the architecture.
_META_KEYS = ("model_type", "transformers_version", "architectures", "_name_or_path", "auto_map")
#: Stock CLIP model types whose configs these classes read as their own.
_ADOPTED = {"clip": "alphaclip", "clip_vision_model": "alphaclip_vision_model"}


class _ReadsCLIPConfigs:
    """Reads a stock CLIP ``config.json`` as its own (no "model of type clip" warning: it is expected)."""

    @classmethod
    def get_config_dict(cls, *args: Any, **kwargs: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)  # type: ignore[misc]
        key = getattr(cls, "base_config_key", None)
        if key and isinstance(config_dict.get(key), dict):  # a vision config read from a whole CLIP's config.json
            config_dict = config_dict[key]
        for d in (config_dict, config_dict.get("vision_config")):
            if isinstance(d, dict) and d.get("model_type") in _ADOPTED:
                d["model_type"] = _ADOPTED[d["model_type"]]
        return config_dict, kwargs


class AlphaCLIPVisionConfig(_ReadsCLIPConfigs, CLIPVisionConfig):
    """A :class:`~transformers.CLIPVisionConfig` for the alpha-aware vision tower.

    The alpha patch embedding has the RGB one's shape with one input channel, so no field is added;
    ``num_channels`` stays 3 (the RGB channels of ``pixel_values``; a fourth channel is alpha).
    """

    model_type = "alphaclip_vision_model"
    base_config_key = "vision_config"  # its part of a whole CLIP's config

    @classmethod
    def from_clip(cls, config: PretrainedConfig, **overrides: Any) -> "AlphaCLIPVisionConfig":
        """The same architecture as a ``CLIPVisionConfig`` (or the vision part of a ``CLIPConfig``)."""
        config = getattr(config, "vision_config", None) or config
        return cls(**{**architecture_dict(config), **overrides})


@builds_sub_configs
class AlphaCLIPConfig(_ReadsCLIPConfigs, CLIPConfig):
    """A :class:`~transformers.CLIPConfig` whose vision tower is an :class:`AlphaCLIPVisionConfig`."""

    model_type = "alphaclip"
    sub_configs_defaults = {"vision_config": AlphaCLIPVisionConfig, "text_config": CLIPTextConfig}

    vision_config: Optional[Dict[str, Any] | AlphaCLIPVisionConfig] = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if type(self.vision_config) is CLIPVisionConfig:  # a stock CLIPVisionConfig was passed in
            self.vision_config = AlphaCLIPVisionConfig.from_clip(self.vision_config)


def architecture_dict(config: PretrainedConfig) -> Dict[str, Any]:
    """``config.to_dict()`` without the keys that name its class or file (to rebuild it as another class)."""
    d = config.to_dict()
    for key in _META_KEYS:
        d.pop(key, None)
    return d
