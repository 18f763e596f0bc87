"""Registration with transformers' auto classes and checkpoint key conversions (runs on import).

transformers v5 renames checkpoint keys on load with per-class conversion mappings; it applies them to
classes outside the library only when they are registered by name. CLIP's vision tower mapping strips
the ``vision_model.`` prefix of checkpoints saved before v5; the alpha-aware towers register the same.
"""
from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForZeroShotImageClassification,
)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import PrefixChange

from .blip2 import AlphaBlip2Config, AlphaBlip2ForConditionalGeneration, AlphaBlip2VisionModel
from .configuration import AlphaCLIPConfig, AlphaCLIPVisionConfig
from .modeling import AlphaCLIPModel, AlphaCLIPVisionModel
from .processing import AlphaCLIPImageProcessor

_DONE = False


def register() -> None:
    """Register configs, models, the image processor and key conversions; calling it again does nothing."""
    global _DONE
    if _DONE:
        return
    AutoConfig.register(AlphaCLIPVisionConfig.model_type, AlphaCLIPVisionConfig, exist_ok=True)
    AutoConfig.register(AlphaCLIPConfig.model_type, AlphaCLIPConfig, exist_ok=True)
    AutoConfig.register(AlphaBlip2Config.model_type, AlphaBlip2Config, exist_ok=True)
    AutoModel.register(AlphaCLIPVisionConfig, AlphaCLIPVisionModel, exist_ok=True)
    AutoModel.register(AlphaCLIPConfig, AlphaCLIPModel, exist_ok=True)
    AutoModelForImageTextToText.register(AlphaBlip2Config, AlphaBlip2ForConditionalGeneration, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(AlphaCLIPConfig, AlphaCLIPModel, exist_ok=True)
    for config in (AlphaCLIPVisionConfig, AlphaCLIPConfig):
        AutoImageProcessor.register(
            config, image_processor_classes={"torchvision": AlphaCLIPImageProcessor, "pil": AlphaCLIPImageProcessor},
            exist_ok=True,
        )
    # Pre-v5 checkpoints of a bare vision tower carry `vision_model.`; the towers themselves do not.
    for cls in (AlphaCLIPVisionModel, AlphaBlip2VisionModel):
        mapping = [PrefixChange(prefix_to_remove="vision_model")]
        register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)
    _DONE = True

