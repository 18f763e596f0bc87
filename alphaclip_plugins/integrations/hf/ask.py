"""Ask a region-aware LLaVA about regions of an image: greedy answers, one per region, in one batch.

``alphaclip ask IMAGE --mask M.png "What is in the highlighted region?"`` calls :func:`ask` with the
embedded tiny model (:data:`~.tiny_llava.TINY_LLAVA_DIR`) unless ``--model DIR`` names another
``LlavaForConditionalGeneration`` directory with an Alpha-CLIP tower and an ``AlphaLlavaProcessor``.

Regions go through the same path as training samples (``core.regions.region_mask`` at the image's
resolution, then the processor's geometry); prompts through the training collator in generation mode
(left padding), so a batch of regions answers exactly as each region alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from ...core.io import PathLike
from ...core.regions import region_mask
from .mllm_collator import RegionConversationCollator

Region = Any  # a mask [H, W] (bool / uint8 / float in [0, 1]), a box (x0, y0, x1, y1), a region dict, or None


def load_llava(model_dir: Optional[PathLike] = None, device: Union[str, torch.device, None] = None) -> Tuple[Any, Any]:
    """``(model, processor)`` of a LLaVA directory (default: the embedded tiny model), fp32, eval mode.

    Raises:
        FileNotFoundError: the directory is missing or holds no model (``config.json``).
        ValueError: it holds a model that is not a LLaVA with an Alpha-CLIP tower, or weights this transformers
            release cannot place (a directory saved by another major release).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from . import register
    from .llava import AlphaLlavaProcessor, _llava_core
    from .modeling import AlphaCLIPVisionModel
    from .tiny_llava import TINY_LLAVA_DIR

    register()
    path = Path(model_dir) if model_dir is not None else TINY_LLAVA_DIR
    if not (path / "config.json").is_file():
        hint = ("reinstall alphaclip-plugins, or train it with: alphaclip train-mllm configs/mllm/tiny_shapes_llava.yaml"
                if model_dir is None else "pass a directory written by save_pretrained (config.json, weights, processor)")
        raise FileNotFoundError(f"no LLaVA model in {path} (no config.json); {hint}")
    model, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    missing = sorted(info["missing_keys"])
    if missing:  # e.g. a transformers 5 export read by 4.x: the tower would be random
        import json

        import transformers

        saved = json.loads((path / "config.json").read_text()).get("transformers_version", "another release")
        raise ValueError(f"{path} does not fit transformers {transformers.__version__}: {len(missing)} "
                         f"weights are missing (e.g. {missing[0]}); it was saved with transformers "
                         f"{saved}: load it with that release, or re-export it with this one")
    model = model.float()
    if not isinstance(_llava_core(model).vision_tower, AlphaCLIPVisionModel):
        raise ValueError(f"{path} holds a LLaVA whose vision tower is not alpha-aware; convert it with alphafy_llava "
                         f"and save it, or pass a region-aware LLaVA directory")
    processor = AutoProcessor.from_pretrained(path)
    if not isinstance(processor, AlphaLlavaProcessor):
        raise ValueError(f"{path} has a {type(processor).__name__}, not an AlphaLlavaProcessor; save the model with "
                         f"AlphaLlavaProcessor.from_model(model, tokenizer).save_pretrained(dir)")
    return model.to(device).eval(), processor


def region_masks(image: Any, regions: Sequence[Region]) -> List[Optional[Any]]:
    """Regions -> float32 masks ``[H, W]`` at the image's resolution (None stays the whole image).

    Raises:
        ValueError: a region that does not fit the image (another size, a box outside it) or covers no pixel.
    """
    masks = []
    for k, region in enumerate(regions):
        mask = region_mask(region, image.height, image.width)
        if mask is not None and not mask.any():
            raise ValueError(f"region {k} is empty: it covers no pixel of the {image.width}x{image.height} image; "
                             f"give a region with pixels inside")
        masks.append(mask)
    return masks


def collator_for(processor: Any) -> RegionConversationCollator:
    """The generation collator (left padding) that :func:`ask` and ``eval-mllm`` build prompts with."""
    return RegionConversationCollator(processor, generation=True)


@torch.no_grad()
def generate(model: Any, collator: RegionConversationCollator, samples: Sequence[Any],
             max_new_tokens: int = 16) -> List[str]:
    """Greedy answers to the last question of each sample (``ConversationSample``), in one batch.

    Raises:
        ValueError: a sample could not be used (its reason is in the message).
    """
    batch = collator(samples)
    if batch["bad"]:
        name, reason = batch["bad"][0]
        raise ValueError(f"{name}: {reason}")
    inputs = {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask", "pixel_values")}
    tok = collator.tokenizer
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=collator.pad_id, eos_token_id=tok.eos_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]  # [B, T]: the generated tokens after each (left-padded) prompt
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


def ask(model: Any, processor: Any, image: Any, regions: Sequence[Region], question: Union[str, Sequence[str]],
        max_new_tokens: int = 16) -> List[str]:
    """Answer ``question`` about each region of ``image`` (greedy decoding), all regions in one batch.

    Args:
        image: an RGB PIL image.
        regions: one entry per answer: a mask ``[H, W]``, a box ``(x0, y0, x1, y1)`` in pixels, a region dict
            (``{"polygon": ...}``, ``{"rle": ...}``), or None for the whole image.
        question: one question for every region, or one per region.

    Returns:
        One answer per region.
    """
    from ...train.mllm_data import ConversationSample

    questions = [question] * len(regions) if isinstance(question, str) else list(question)
    if len(questions) != len(regions):
        raise ValueError(f"got {len(questions)} questions for {len(regions)} regions; pass one, or one per region")
    if any(not q.strip() for q in questions):
        raise ValueError("the question is empty; ask something, e.g. \"What is in the highlighted region?\"")
    masks = region_masks(image, regions)
    samples = [ConversationSample(image, m, [("human", f"<image>\n{q}"), ("gpt", "")], f"region {k}")
               for k, (m, q) in enumerate(zip(masks, questions))]
    return generate(model, collator_for(processor), samples, max_new_tokens)
