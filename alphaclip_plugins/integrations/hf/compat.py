"""What differs between the transformers releases this integration supports (4.37 through 5.x), in one place.

Everything else in ``integrations/hf`` is written once against the names here. Differences handled:

* v5 flattened ``CLIPVisionModel`` / ``CLIPTextModel`` (4.x wraps a ``CLIPVisionTransformer`` as
  ``vision_model``); :func:`inner` gives the module that holds the layers either way;
* v5 configs are dataclasses with ``sub_configs_defaults``; 4.x configs build sub-configs in ``__init__``
  (:func:`builds_sub_configs`); ``PreTrainedConfig`` was ``PretrainedConfig``;
* ``interpolate_pos_encoding`` (CLIP, 4.46+), per-class checkpoint key renames (v5),
  ``transformers.initialization`` (v5), ``processing_utils.ImagesKwargs``, ``AutoModelForImageTextToText``,
  the image processor registry's signature, and whether ``LlavaProcessor`` expands ``<image>`` (4.45+).

A feature an installed release cannot have raises :class:`TransformersVersionError` naming the release it needs.
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import Any, Callable, Dict, Tuple, Type, TypedDict

import torch
import transformers
from torch import nn
from transformers import LlavaProcessor
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

MIN_VERSION = (4, 37)
VERSION: Tuple[int, int] = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())  # type: ignore[assignment]
V5 = VERSION >= (5, 0)

if VERSION < MIN_VERSION:
    raise ImportError(
        f"alphaclip_plugins.integrations.hf needs transformers>=4.37 (found {transformers.__version__}); "
        f"install a newer one, e.g. pip install 'transformers>=4.37'"
    )


class TransformersVersionError(RuntimeError):
    """A feature the installed transformers release does not have."""


def needs(feature: str, version: str) -> TransformersVersionError:
    return TransformersVersionError(
        f"{feature} needs transformers>={version} (found {transformers.__version__}); upgrade transformers to use it"
    )


PretrainedConfig: Type[Any] = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
#: The auto class of image-text-to-text models (BLIP-2, LLaVA); ``AutoModelForVision2Seq`` before 4.46.
AutoImageTextModel: Any = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq

try:
    from transformers.processing_utils import ImagesKwargs
except ImportError:  # 4.37: processors do not type their image options

    class ImagesKwargs(TypedDict, total=False):  # type: ignore[no-redef]
        pass


try:
    from transformers.initialization import zeros_
except ImportError:  # before v5, weights are plain tensors: torch's initialiser is the one
    zeros_ = nn.init.zeros_

#: CLIP's embeddings take ``interpolate_pos_encoding`` (other image sizes) from 4.46 on.
CLIP_INTERPOLATES = "interpolate_pos_encoding" in inspect.signature(CLIPVisionEmbeddings.forward).parameters
#: ``LlavaProcessor`` expands each ``<image>`` into one token per image feature from 4.45 on (the model did before).
LLAVA_PROCESSOR_EXPANDS = "patch_size" in inspect.signature(LlavaProcessor.__init__).parameters
#: 4.x processors load their parts by the class names these attributes give (4.37's LLaVA names CLIP's and
#: Llama's); v5 reads the saved classes without them.
PROCESSOR_PART_CLASSES = {} if V5 else {"image_processor_class": "AutoImageProcessor", "tokenizer_class": "AutoTokenizer"}


def interpolation(interpolate_pos_encoding: bool | None) -> Dict[str, bool]:
    """The ``interpolate_pos_encoding`` keyword for CLIP's forward where it exists (none before 4.46)."""
    if CLIP_INTERPOLATES:
        return {"interpolate_pos_encoding": bool(interpolate_pos_encoding)}
    if interpolate_pos_encoding:
        raise needs("interpolate_pos_encoding (images of another size than the config's)", "4.46")
    return {}


def inner(model: nn.Module) -> nn.Module:
    """The module holding a CLIP tower's layers: the model itself from v5, its ``vision_model``/``text_model`` before."""
    if V5:
        return model
    return getattr(model, "vision_model", None) or model.text_model


def builds_sub_configs(cls: type) -> type:
    """Make ``cls.sub_configs_defaults`` (key -> config class) hold on transformers 4.x too.

    v5 builds sub-configs from that table itself; 4.x configs build stock classes in ``__init__``, so there
    the entries are rebuilt as the table's classes (from the same fields) after it.
    """
    if V5:
        return cls
    original: Callable[..., None] = cls.__init__  # type: ignore[misc]

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        # 4.37's composite configs take their sub-configs as dicts only.
        kwargs = {k: v.to_dict() if isinstance(v, PretrainedConfig) else v for k, v in kwargs.items()}
        given = {key: dict(kwargs.get(key) or {}) for key in self.sub_configs_defaults}
        original(self, *args, **kwargs)
        for key, config_class in self.sub_configs_defaults.items():
            given[key].pop("model_type", None)
            setattr(self, key, config_class(**given[key]))

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


def sub_configs_defaults(config_class: type) -> Dict[str, Any]:
    """A v5 config class's sub-config table (empty before v5, where it does not exist)."""
    return dict(getattr(config_class, "sub_configs_defaults", None) or {})


def register_image_processor(auto: Any, config_class: type, processor_class: type) -> None:
    """``AutoImageProcessor.register`` across its three signatures."""
    params = inspect.signature(auto.register).parameters
    if "image_processor_classes" in params:  # v5: one class per backend
        auto.register(config_class, image_processor_classes={"torchvision": processor_class, "pil": processor_class},
                      exist_ok=True)
    elif "slow_image_processor_class" in params:
        auto.register(config_class, slow_image_processor_class=processor_class, exist_ok=True)
    else:
        auto.register(config_class, processor_class, exist_ok=True)


def register_prefix_removal(class_names: Tuple[str, ...], prefix: str) -> None:
    """v5: strip ``prefix`` from checkpoint keys loaded into these classes (4.x checkpoints keep it: nothing to do)."""
    if not V5:
        return
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    for name in class_names:
        register_checkpoint_conversion_mapping(name, [PrefixChange(prefix_to_remove=prefix)], overwrite=True)


def dtype_kwarg(dtype: torch.dtype) -> Dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword: ``dtype`` from 4.56 on, ``torch_dtype`` before."""
    return {"dtype": dtype} if VERSION >= (4, 56) else {"torch_dtype": dtype}


def init_keywords(cls: type, options: Dict[str, Any]) -> Dict[str, Any]:
    """The entries of ``options`` that ``cls.__init__`` takes (all when it takes ``**kwargs``).

    4.37's processors take their parts only, so the ``patch_size`` (etc.) that later releases save in
    ``processor_config.json`` must be left out there.
    """
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


#: Checkpoint key renames (regex, replacement, applied in order) from any release's LLaVA names to the one
#: layout every release reads: 4.37's (``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
#: ``language_model.model.*``, ``language_model.lm_head.*``). 4.4x-4.5x save it themselves; 5.x saves the
#: tower flat (no ``vision_model.``) and reads it back either way (the Alpha towers strip the prefix on
#: load); 4.4x and later convert the rest on load.
LLAVA_PORTABLE_KEYS: Tuple[Tuple[str, str], ...] = (
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
)

#: The same for the Alpha BLIP-2 (its tower is ``vision_model``; the rest has one name on every release).
BLIP2_PORTABLE_KEYS: Tuple[Tuple[str, str], ...] = (
    (r"^vision_model\.(?!vision_model\.)", "vision_model.vision_model."),
)
#: ``config.model_type`` -> its rules.
PORTABLE_KEYS = {"llava": LLAVA_PORTABLE_KEYS, "alphaclip_blip_2": BLIP2_PORTABLE_KEYS}


def portable_key(key: str, rules: Tuple[Tuple[str, str], ...] = LLAVA_PORTABLE_KEYS) -> str:
    """A saved checkpoint key under :data:`LLAVA_PORTABLE_KEYS` (or other ``rules``)."""
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key
