"""BLIP-2 with an Alpha-CLIP image tower: region captioning and Q-Former tuning.

transformers' ``Blip2ForConditionalGeneration`` builds its EVA tower itself. The variant here builds an
Alpha-CLIP tower instead and changes nothing else: the Q-Former's cross-attention is sized to the
tower's width (``qformer_config.encoder_hidden_size = vision_config.hidden_size``, as ``Blip2Config``
already sets it), and every method passes alpha through as a 4th channel of ``pixel_values``.

A typical recipe: :meth:`AlphaBlip2ForConditionalGeneration.from_blip2` (a trained BLIP-2's Q-Former and
language model + an Alpha-CLIP tower), :meth:`~AlphaBlip2ForConditionalGeneration.freeze_for_qformer_tuning`,
train on region-caption pairs, then ``generate(pixel_values=rgba)``.
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, Blip2Config, Blip2ForConditionalGeneration
from transformers.models.blip_2.modeling_blip_2 import Blip2PreTrainedModel, Blip2QFormerModel

from . import compat
from .configuration import AlphaCLIPVisionConfig, architecture_dict
from .modeling import AlphaCLIPVisionModel, merge_alpha, vision_body

logger = logging.getLogger(__name__)


@compat.builds_sub_configs
class AlphaBlip2Config(Blip2Config):
    """A :class:`~transformers.Blip2Config` whose ``vision_config`` is an :class:`AlphaCLIPVisionConfig`."""

    model_type = "alphaclip_blip_2"
    sub_configs_defaults = {**compat.sub_configs_defaults(Blip2Config), "vision_config": AlphaCLIPVisionConfig}


class AlphaBlip2VisionModel(AlphaCLIPVisionModel):
    """The Alpha-CLIP tower as BLIP-2's Q-Former reads it.

    ``last_hidden_state [B, 1 + N, hidden]`` holds all tokens after ``post_layernorm`` (BLIP-2's
    ``ln_vision``); ``pooler_output`` and ``hidden_states`` are :class:`AlphaCLIPVisionModel`'s.
    """

    def forward(self, pixel_values: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any):
        out = super().forward(pixel_values, *args, **kwargs)
        norm = vision_body(self).post_layernorm
        if isinstance(out, tuple):
            return (norm(out[0]),) + tuple(out[1:])
        out.last_hidden_state = norm(out.last_hidden_state)
        return out


class AlphaBlip2ForConditionalGeneration(Blip2ForConditionalGeneration):
    """``Blip2ForConditionalGeneration`` with an :class:`AlphaBlip2VisionModel` as ``vision_model``.

    ``forward``, ``generate`` and ``get_image_features`` take ``pixel_values [B, 4, H, W]`` (RGB + encoded
    alpha), or ``[B, 3, H, W]`` plus ``alpha_values [B, 1, H, W]``; 3 channels alone caption the whole image.
    """

    config_class = AlphaBlip2Config
    config: AlphaBlip2Config

    def __init__(self, config: AlphaBlip2Config):
        Blip2PreTrainedModel.__init__(self, config)
        self.vision_model = AlphaBlip2VisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        lm_class = AutoModelForCausalLM if config.use_decoder_only_language_model else AutoModelForSeq2SeqLM
        self.language_model = lm_class.from_config(config.text_config)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, *args: Any, alpha_values: Optional[torch.Tensor] = None,
                           **kwargs: Any):
        """As ``Blip2ForConditionalGeneration.get_image_features``, for RGB(A) ``pixel_values`` (+ ``alpha_values``)."""
        return super().get_image_features(merge_alpha(pixel_values, alpha_values), *args, **kwargs)

    def forward(self, pixel_values: Optional[torch.Tensor] = None, input_ids: Optional[torch.LongTensor] = None,
                *args: Any, alpha_values: Optional[torch.Tensor] = None, **kwargs: Any):
        """As ``Blip2ForConditionalGeneration.forward``: one prompt in ``input_ids`` per (image, region) sample.

        Where the release's ``Blip2Processor`` puts ``num_query_tokens`` image tokens in front of each prompt
        (transformers 5, 4.57), ``input_ids`` start with them; on older releases (4.37) the model puts the query
        outputs in front of the prompt itself.
        """
        pixel_values = merge_alpha(pixel_values, alpha_values)
        _check_one_prompt_per_region(pixel_values, input_ids)
        return super().forward(pixel_values, input_ids, *args, **kwargs)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, *args: Any, alpha_values: Optional[torch.Tensor] = None,
                 **kwargs: Any) -> torch.LongTensor:
        """Caption each (image, region) sample: ``[B, tokens]`` ids, as ``Blip2ForConditionalGeneration.generate``.

        ``input_ids`` (optional) hold one prompt per sample.
        """
        pixel_values = merge_alpha(pixel_values, alpha_values)
        _check_one_prompt_per_region(pixel_values, args[0] if args else kwargs.get("input_ids"))
        return super().generate(pixel_values, *args, **kwargs)

    def freeze_for_qformer_tuning(self, train_language_projection: bool = True) -> List[str]:
        """Freeze the image tower and the language model; train the Q-Former, its queries (and the projection).

        Returns:
            The names of the parameters left trainable (for the optimizer, or a check).
        """
        self.requires_grad_(False)
        trainable: List[nn.Module] = [self.qformer] + ([self.language_projection] if train_language_projection else [])
        for module in trainable:
            module.requires_grad_(True)
        self.query_tokens.requires_grad_(True)
        return [n for n, p in self.named_parameters() if p.requires_grad]

    @classmethod
    def from_blip2(cls, blip2: Blip2ForConditionalGeneration, vision_model: AlphaCLIPVisionModel
                   ) -> "AlphaBlip2ForConditionalGeneration":
        """A trained BLIP-2's Q-Former, projection and language model with an Alpha-CLIP tower.

        The Q-Former's cross-attention keys and values read the tower's width; where it differs from the
        BLIP-2 tower's, they start fresh (logged) and need training, e.g. with :meth:`freeze_for_qformer_tuning`.

        Args:
            blip2: the BLIP-2 to take the Q-Former and language model from (left unchanged).
            vision_model: an :class:`AlphaCLIPVisionModel` (e.g. ``AutoModel.from_pretrained`` of an
                ``export_hf`` directory's ``vision_model``) whose weights are copied.
        """
        parts = {k: v for k, v in architecture_dict(blip2.config).items() if k not in ("vision_config",)}
        parts["vision_config"] = AlphaCLIPVisionConfig(**architecture_dict(vision_model.config))
        model = cls(AlphaBlip2Config(**parts)).to(blip2.dtype)
        own = model.state_dict()
        sd = {k: v for k, v in blip2.state_dict().items() if not k.startswith("vision_model.")}
        fresh = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
        model.load_state_dict({k: v for k, v in sd.items() if k not in fresh}, strict=False)
        model.vision_model.load_state_dict(vision_model.state_dict())
        if fresh:
            logger.warning("re-initialised for the new tower width (train them): %s", ", ".join(fresh))
        model.reinitialized_keys = fresh  # type: ignore[attr-defined]
        return model.eval()


def _check_one_prompt_per_region(pixel_values: Optional[torch.Tensor], input_ids: Optional[torch.Tensor]) -> None:
    """BLIP-2 pairs sample i's image features with prompt i; other counts would drop or reuse regions silently."""
    if pixel_values is not None and input_ids is not None and pixel_values.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"got {pixel_values.shape[0]} (image, region) samples but {input_ids.shape[0]} prompts; BLIP-2 captions "
            f"one region per prompt: repeat the prompt for each region (or the image for each prompt)"
        )
