"""Registration with transformers' auto classes and checkpoint key conversions (runs on import).

transformers v5 renames checkpoint keys on load with per-class conversion mappings; it applies them to
classes outside the library only when they are registered by name. CLIP's vision tower mapping strips
the ``vision_model.`` prefix of checkpoints saved before v5; the alpha-aware towers register the same
(4.x keeps the prefix: nothing to rename there).
"""
from __future__ import annotations

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor

from . import compat
from .blip2 import AlphaBlip2Config, AlphaBlip2ForConditionalGeneration, AlphaBlip2VisionModel
from .configuration import AlphaCLIPConfig, AlphaCLIPVisionConfig
from .llava import AlphaLlavaProcessor, AlphaLlavaProcessorKey
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
    compat.AutoImageTextModel.register(AlphaBlip2Config, AlphaBlip2ForConditionalGeneration, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(AlphaCLIPConfig, AlphaCLIPModel, exist_ok=True)
    for config in (AlphaCLIPVisionConfig, AlphaCLIPConfig):
        compat.register_image_processor(AutoImageProcessor, config, AlphaCLIPImageProcessor)
    # AutoProcessor finds a saved processor's class among the registered ones, by the name in its files.
    AutoProcessor.register(AlphaLlavaProcessorKey, AlphaLlavaProcessor, exist_ok=True)
    # v5: pre-v5 checkpoints of a bare vision tower carry `vision_model.`; the towers themselves do not.
    compat.register_prefix_removal((AlphaCLIPVisionModel.__name__, AlphaBlip2VisionModel.__name__), "vision_model")
    _DONE = True
