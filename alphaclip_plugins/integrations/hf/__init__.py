"""Alpha-CLIP for Hugging Face transformers (4.37 through 5.x): models, image processor, LLaVA and BLIP-2.

Importing this module registers the classes with transformers' auto classes (``AutoConfig``,
``AutoModel``, ``AutoModelForZeroShotImageClassification``, ``AutoImageProcessor``) and the key
renames that let stock CLIP checkpoints load. It needs ``pip install 'alphaclip-plugins[hf]'`` (which keeps
an installed transformers>=4.37); what differs between releases lives in :mod:`.compat`.

Example::

    import alphaclip_plugins.integrations.hf as ahf
    from transformers import AutoImageProcessor

    ahf.export_hf("clip_l14_grit20m_fultune_2xe.pth", "alpha-clip-l14")  # once: the official vision tower
    model = ahf.AlphaCLIPVisionModelWithProjection.from_pretrained("alpha-clip-l14")
    processor = AutoImageProcessor.from_pretrained("alpha-clip-l14")
    inputs = processor(image, regions=[mask, (10, 20, 200, 240)], return_tensors="pt")  # [2, 4, 224, 224]
    embeds = model(**inputs).image_embeds  # [2, 768]: one per region

A two-tower checkpoint (OpenAI CLIP + Alpha-CLIP tower) exports to an ``AlphaCLIPModel`` that
``AutoModel`` and ``AutoModelForZeroShotImageClassification`` load.
"""
from __future__ import annotations

from .. import require

require("transformers", "hf")

from . import compat  # noqa: E402,F401  (first: it raises for transformers<4.37)
from .configuration import AlphaCLIPConfig, AlphaCLIPVisionConfig  # noqa: E402
from .modeling import (  # noqa: E402
    AlphaCLIPModel,
    AlphaCLIPVisionEmbeddings,
    AlphaCLIPVisionModel,
    AlphaCLIPVisionModelWithProjection,
    merge_alpha,
    vision_body,
)
from .processing import AlphaCLIPImageProcessor  # noqa: E402
from .registration import register  # noqa: E402
from .export import build_hf_model, export_hf, load_alpha_weights  # noqa: E402
from .llava import AlphaLlavaProcessor, alphafy_llava  # noqa: E402
from .llava_tower import AlphaCLIPVisionTower  # noqa: E402
from .mllm_collator import RegionConversationCollator  # noqa: E402
from .blip2 import AlphaBlip2Config, AlphaBlip2ForConditionalGeneration, AlphaBlip2VisionModel  # noqa: E402
from .compat import TransformersVersionError  # noqa: E402

register()

__all__ = [
    "AlphaCLIPConfig", "AlphaCLIPVisionConfig", "AlphaCLIPModel", "AlphaCLIPVisionEmbeddings", "AlphaCLIPVisionModel",
    "AlphaCLIPVisionModelWithProjection", "AlphaCLIPImageProcessor", "merge_alpha", "build_hf_model", "export_hf",
    "load_alpha_weights", "AlphaLlavaProcessor", "alphafy_llava", "AlphaCLIPVisionTower", "RegionConversationCollator", "AlphaBlip2Config",
    "AlphaBlip2ForConditionalGeneration", "AlphaBlip2VisionModel", "register", "vision_body", "TransformersVersionError",
]
