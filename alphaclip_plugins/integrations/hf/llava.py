"""LLaVA (transformers' ``LlavaForConditionalGeneration``) with an Alpha-CLIP image tower.

Two ways to get one:

* build it: a ``LlavaConfig`` whose ``vision_config`` is an :class:`AlphaCLIPVisionConfig` makes
  ``LlavaForConditionalGeneration(config)`` (and ``from_pretrained`` of such a directory) use
  :class:`AlphaCLIPVisionModel` through ``AutoModel``;
* convert one: :func:`alphafy_llava` swaps a trained LLaVA's CLIP tower for an alpha-aware one in place,
  keeping its weights, and optionally loads Alpha-CLIP weights into it.

The region travels with the image as a 4th channel of ``pixel_values``, so each sample of a batch has
its own region. :class:`AlphaLlavaProcessor` builds the prompts and the 4-channel pixel values.
"""
from __future__ import annotations

import itertools
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn
from transformers import CLIPVisionModel, LlavaProcessor, PreTrainedModel
from transformers.image_processing_utils import BatchFeature

from ...core.io import PathLike
from . import compat
from .configuration import AlphaCLIPVisionConfig
from .export import load_alpha_weights
from .modeling import AlphaCLIPVisionModel, vision_body
from .processing import AlphaCLIPImageProcessor


def _llava_core(model: nn.Module) -> nn.Module:
    """The module holding ``vision_tower`` (``LlavaModel``), from it or ``LlavaForConditionalGeneration``.

    (4.4x's ``LlavaForConditionalGeneration.vision_tower`` is a read-only view of ``model.vision_tower``; 4.37's
    holds the tower itself.)
    """
    for candidate in (getattr(model, "model", None), model):
        if candidate is not None and hasattr(candidate, "vision_tower"):
            return candidate
    raise TypeError(f"{type(model).__name__} has no vision_tower; pass a LlavaForConditionalGeneration or LlavaModel")


def _alpha_tower(old: CLIPVisionModel) -> AlphaCLIPVisionModel:
    """The same tower, alpha-aware: its tensors are reused (no copy), the alpha conv starts at zero."""
    config = AlphaCLIPVisionConfig.from_clip(old.config)
    config._attn_implementation = old.config._attn_implementation
    reference = vision_body(old).embeddings.patch_embedding.weight
    with torch.device("meta"):  # no memory and no random init for weights that are replaced next
        tower = AlphaCLIPVisionModel(config)
    trainable = {n: p.requires_grad for n, p in old.named_parameters()}
    tower.load_state_dict(old.state_dict(keep_vars=True), strict=False, assign=True)
    for name, param in tower.named_parameters():  # `assign` keeps the new module's flags; restore the old ones
        param.requires_grad_(trainable.get(name, param.requires_grad))
    emb = vision_body(tower).embeddings
    emb.patch_embedding_alpha.weight = nn.Parameter(
        torch.zeros(emb.embed_dim, 1, emb.patch_size, emb.patch_size, device=reference.device, dtype=reference.dtype),
        requires_grad=reference.requires_grad,
    )
    emb.position_ids = vision_body(old).embeddings.position_ids  # a non-persistent buffer: not in the state dict
    left = [n for n, t in itertools.chain(tower.named_parameters(), tower.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"could not carry over {left} from the CLIP tower; is it a CLIPVisionModel?")
    return tower.train(old.training)


def alphafy_llava(
    model: PreTrainedModel, alpha_checkpoint: Optional[Union[PathLike, Mapping[str, torch.Tensor]]] = None
) -> PreTrainedModel:
    """Make a LLaVA's CLIP image tower alpha-aware, in place.

    The tower's weights are kept (the new alpha conv is zero, so outputs do not change) and the config's
    ``vision_config`` becomes an :class:`AlphaCLIPVisionConfig`, so ``save_pretrained`` /
    ``from_pretrained`` keep the alpha tower.

    Args:
        model: a ``LlavaForConditionalGeneration`` or ``LlavaModel`` with a ``CLIPVisionModel`` tower.
        alpha_checkpoint: Alpha-CLIP vision weights of the tower's architecture (e.g. the official
            ``clip_l14_336_grit_20m_4xe.pth`` for LLaVA-1.5's ViT-L/14-336), in any layout the core reads.

    Returns:
        ``model``, whose ``pixel_values`` may now have 4 channels (RGB + encoded alpha).
    """
    core = _llava_core(model)
    tower = core.vision_tower
    if not isinstance(tower, AlphaCLIPVisionModel):
        if not isinstance(tower, CLIPVisionModel):
            raise TypeError(
                f"this LLaVA's vision tower is a {type(tower).__name__}; alphafy_llava converts CLIPVisionModel towers"
            )
        tower = _alpha_tower(tower)
        core.vision_tower = tower
        for owner in {id(model): model, id(core): core}.values():
            owner.config.vision_config = tower.config
    if alpha_checkpoint is not None:
        load_alpha_weights(tower, alpha_checkpoint)
    return model


class AlphaLlavaProcessorKey(compat.PretrainedConfig):
    """Only a key: ``AutoProcessor`` looks registered processors up by a config class (no model uses this one)."""

    model_type = "alphaclip_llava_processor"


class AlphaLlavaProcessor(LlavaProcessor):
    """``LlavaProcessor`` for 4-channel images: prompts with image tokens, and RGBA ``pixel_values``.

    ``processor(images=[img_a, img_b], text=[prompt_a, prompt_b], regions=[mask_a, box_b])`` gives one
    region per image (a box is a tuple ``(x0, y0, x1, y1)``; None = whole image). Where the release's LLaVA
    wants each ``<image>`` expanded in the prompt (transformers 4.45 on), this processor counts the image
    tokens from the tensor's height and width (the stock one cannot size a 4-channel image); before 4.45
    the model expands it.

    Build it with :meth:`from_model` or as ``LlavaProcessor`` is built, with an
    :class:`AlphaCLIPImageProcessor` as ``image_processor``. ``save_pretrained`` writes it; ``from_pretrained``
    and ``AutoProcessor.from_pretrained`` read it back.
    """

    if compat.PROCESSOR_PART_CLASSES:
        image_processor_class = compat.PROCESSOR_PART_CLASSES["image_processor_class"]
        tokenizer_class = compat.PROCESSOR_PART_CLASSES["tokenizer_class"]

    @classmethod
    def from_args_and_dict(cls, args: Any, processor_dict: dict, **kwargs: Any) -> Any:
        """Build from a saved ``processor_config.json``, leaving out the keys this release's LLaVA processor
        does not take (4.37 takes none: a directory saved by a later release carries ``patch_size`` etc.)."""
        if not compat.V5:  # the parts come as ``args``; a nested copy of one would be passed twice
            parts = {k: v for k, v in processor_dict.items() if k not in ("image_processor", "tokenizer")}
            processor_dict = compat.init_keywords(LlavaProcessor, parts)
        return super().from_args_and_dict(args, processor_dict, **kwargs)

    @classmethod
    def from_model(
        cls, model: PreTrainedModel, tokenizer: Any, mode: str = "pad", **kwargs: Any
    ) -> "AlphaLlavaProcessor":
        """A processor matching ``model``'s tower size, patch size and feature selection."""
        config = model.config
        vision = config.vision_config
        if compat.LLAVA_PROCESSOR_EXPANDS:
            kwargs = dict(patch_size=vision.patch_size, num_additional_image_tokens=1,
                          vision_feature_select_strategy=config.vision_feature_select_strategy, **kwargs)
        return cls(image_processor=AlphaCLIPImageProcessor(image_size=vision.image_size, mode=mode),
                   tokenizer=tokenizer, **kwargs)

    def __call__(self, images: Any = None, text: Any = None, regions: Any = None, return_tensors: Any = None,
                 images_kwargs: Optional[dict] = None, **text_kwargs: Any) -> BatchFeature:
        """Prompts and images -> ``input_ids``, ``attention_mask`` and ``pixel_values [B, 4, H, W]``.

        Args:
            images: one image or a list (PIL, numpy ``[H, W, 3]``, torch ``[3, H, W]``), one per ``<image>``.
            text: a prompt or a list of prompts with ``<image>`` where each image goes.
            regions: one per image (mask, box, polygon, RLE or None = whole image); None = every image whole.
            return_tensors: ``"pt"``, ``"np"`` or None.
            images_kwargs: options of :meth:`AlphaCLIPImageProcessor.preprocess` (``mode``, ``image_size``).
            **text_kwargs: the tokenizer's options (``padding``, ``truncation``, ...).
        """
        if images is None and text is None:
            raise ValueError("pass images, text or both")
        if regions is not None and images is None:
            raise ValueError("got regions without images; pass the images the regions belong to")
        data: dict = {}
        if images is not None:
            batch = self.image_processor(images, regions=regions, return_image_index=True, return_tensors="pt",
                                         **(images_kwargs or {}))
            index = batch["image_index"]
            if not torch.equal(index, torch.arange(len(index))):
                raise ValueError(
                    f"got {int(index.max()) + 1} images but {len(index)} regions; an <image> token takes one region, "
                    f"so pass one region per image (repeat an image to ask about several of its regions)"
                )
            data["pixel_values"] = batch["pixel_values"]
        if text is not None:
            prompts = [text] if isinstance(text, str) else list(text)
            if images is not None and compat.LLAVA_PROCESSOR_EXPANDS:
                token = self.image_token
                prompts = [p.replace(token, token * self._image_tokens(data["pixel_values"])) for p in prompts]
            data.update(self.tokenizer(prompts, **{"return_token_type_ids": False, **text_kwargs}))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _image_tokens(self, pixel_values: torch.Tensor) -> int:
        """How many ``<image>`` tokens one image takes, from its ``[4, H, W]`` height and width."""
        if self.patch_size is None:
            raise ValueError("this processor has no patch_size; build it with AlphaLlavaProcessor.from_model(model, ...)")
        height, width = pixel_values.shape[-2:]
        tokens = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return tokens - 1 if self.vision_feature_select_strategy == "default" else tokens  # "default" drops CLS
