"""Export a fine-tuned transformers LLaVA for the original LLaVA code base (``llava.model.builder``).

LLaVA's ``load_pretrained_model(path, None, name)`` (``name`` must contain "llava") reads an
``LlavaLlamaForCausalLM`` directory: a Llama config with LLaVA's ``mm_*`` fields, the language model and
the projector under LLaVA's names (``model.layers.*``, ``lm_head``, ``model.mm_projector.{0,2}``), the
tokenizer, and the image tower from ``mm_vision_tower``. Here that is the directory's ``vision_tower/``
(the fine-tuned Alpha tower, ``save_pretrained``), named by its absolute path; with docs/llava.md's
two-line builder patch LLaVA builds an :class:`AlphaCLIPVisionTower` from it, alpha conv included
(edit ``mm_vision_tower`` in ``config.json`` after moving the directory).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from ..core.io import atomic_directory, save_safetensors


def _parts(model: nn.Module):
    """(decoder body, lm_head, projector, tower) of a transformers LLaVA, 4.37 or 4.4x+ layout."""
    from alphaclip_plugins.integrations.hf.llava import _llava_core

    core = _llava_core(model)
    lm = core.language_model
    body = lm.model if hasattr(lm, "lm_head") else lm  # 4.37: LlamaForCausalLM; later: LlamaModel
    head = lm.lm_head if hasattr(lm, "lm_head") else model.lm_head
    return body, head, core.multi_modal_projector, core.vision_tower


def original_config(model: nn.Module, tower_dir: Path) -> Dict[str, Any]:
    """LLaVA's ``LlavaConfig`` of ``model``: its Llama text config and the ``mm_*`` fields.

    Raises:
        ValueError: a language model other than Llama, or a projector other than LLaVA-1.5's ``mlp2x_gelu``.
    """
    config = model.config
    text = config.text_config
    if text.model_type != "llama":
        raise ValueError(f"the original LLaVA reads Llama language models (llava_llama); this one is a "
                         f"{text.model_type!r}; use the transformers export instead")
    if getattr(config, "projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"the original LLaVA's mlp2x_gelu projector uses gelu; this one uses "
                         f"{config.projector_hidden_act!r}")
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    out = {k: v for k, v in text.to_dict().items() if not k.startswith("_")}
    out.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", mm_vision_tower=str(tower_dir),
               mm_vision_select_layer=int(config.vision_feature_layer), mm_projector_type="mlp2x_gelu",
               mm_vision_select_feature="patch" if strategy == "default" else "cls_patch",
               mm_hidden_size=int(config.vision_config.hidden_size), mm_use_im_start_end=False,
               mm_use_im_patch_token=False, image_aspect_ratio="pad", use_cache=True)
    return out


def original_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The language model and projector weights under LLaVA's names (the tower is saved on its own)."""
    body, head, projector, _ = _parts(model)
    sd = {f"model.{k}": v for k, v in body.state_dict().items()}
    sd.update({f"lm_head.{k}": v for k, v in head.state_dict().items()})
    for index, layer in ((0, projector.linear_1), (2, projector.linear_2)):  # Linear, GELU, Linear
        sd.update({f"model.mm_projector.{index}.{k}": v for k, v in layer.state_dict().items()})
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_original_llava(model: nn.Module, tokenizer: Any, target: Path,
                        extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write the LLaVA code base's directory for ``model`` (LoRA already merged) to ``target``, atomically;
    ``extra(folder)`` adds files (a run's marker)."""
    target = Path(target).resolve()
    config = original_config(model, target / "vision_tower")
    _, _, _, tower = _parts(model)

    with atomic_directory(target, overwrite=True) as folder:  # check_export_target allowed replacing it
        tower.save_pretrained(folder / "vision_tower")
        save_safetensors(original_state_dict(model), folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(folder)
        if extra is not None:
            extra(folder)
    return target
