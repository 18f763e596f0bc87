"""The model side of ``train-mllm``: load an HF LLaVA / BLIP-2 directory, choose what trains, build its collator.

``model.path`` may hold

* an Alpha LLaVA (``LlavaForConditionalGeneration`` whose tower is an :class:`AlphaCLIPVisionModel`, as
  ``alphafy_llava`` + ``save_pretrained`` writes it);
* a stock LLaVA (CLIP tower): it is alphafied on load, with ``model.alpha_checkpoint``'s weights if given;
* an Alpha BLIP-2 (:class:`AlphaBlip2ForConditionalGeneration`).

The parts of a model are named once (:class:`Parts`): ``projector`` (LLaVA's ``multi_modal_projector``;
BLIP-2's Q-Former, query tokens and language projection), ``lm``, ``tower`` and the tower's ``alpha`` conv.
Frozen parts get ``requires_grad=False``, so neither the optimizer nor DDP sees them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from .mllm_config import MLLMModelConfig, MLLMOptimConfig


@dataclass
class Parts:
    """The trainable parts of an MLLM, by role (modules or parameters of the one model)."""

    kind: str  # "llava" or "blip2"
    projector: List[nn.Module]
    lm: nn.Module
    tower: nn.Module
    alpha: nn.Module  # the tower's alpha patch embedding
    extra: List[nn.Parameter]  # parameters outside modules that train with the projector (BLIP-2's query tokens)


def model_kind(path: str) -> str:
    """``"llava"`` or ``"blip2"`` (an Alpha BLIP-2) from a directory's ``config.json``.

    Raises:
        ValueError: no ``config.json`` there, a stock BLIP-2 (not alpha-aware), or a model type that is neither.
    """
    config = Path(path) / "config.json"
    if not config.is_file():
        raise ValueError(f"model.path {path} has no config.json; point it at a save_pretrained directory")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type == "llava":
        return "llava"
    if model_type == "alphaclip_blip_2":
        return "blip2"
    if model_type == "blip-2":
        raise ValueError(f"{path} is a stock BLIP-2; build an Alpha BLIP-2 first "
                         f"(AlphaBlip2ForConditionalGeneration.from_blip2) and save_pretrained it")
    raise ValueError(f"model.path {path} holds a {model_type!r} model; train-mllm takes LLaVA (model_type 'llava') "
                     f"or an Alpha BLIP-2 ('alphaclip_blip_2')")


def load_model(cfg: MLLMModelConfig) -> Tuple[nn.Module, str]:
    """The model of ``cfg.path`` in fp32, alpha-aware, in training mode; and its kind."""
    import alphaclip_plugins.integrations.hf as ahf

    kind = model_kind(str(cfg.path))
    if kind == "blip2":
        model = ahf.AlphaBlip2ForConditionalGeneration.from_pretrained(cfg.path, torch_dtype=torch.float32)
        if cfg.alpha_checkpoint:
            ahf.load_alpha_weights(model.vision_model, cfg.alpha_checkpoint)
        return model.train(), kind
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(cfg.path, torch_dtype=torch.float32)
    return ahf.alphafy_llava(model, cfg.alpha_checkpoint).train(), kind


def parts(model: nn.Module, kind: str) -> Parts:
    from alphaclip_plugins.integrations.hf import vision_body
    from alphaclip_plugins.integrations.hf.llava import _llava_core

    if kind == "blip2":
        tower = model.vision_model
        return Parts(kind, [model.qformer, model.language_projection], model.language_model, tower,
                     vision_body(tower).embeddings.patch_embedding_alpha, [model.query_tokens])
    core = _llava_core(model)
    lm = nn.ModuleList([core.language_model, model.lm_head]) if hasattr(model, "lm_head") else core.language_model
    tower = core.vision_tower
    return Parts(kind, [core.multi_modal_projector], lm, tower, vision_body(tower).embeddings.patch_embedding_alpha, [])


def _lora(model: nn.Module, lm: nn.Module, cfg: MLLMModelConfig) -> nn.Module:
    """LoRA adapters (peft) on the language model's ``lora_targets`` linears; nothing else changes."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("model.train_lm=lora needs peft: pip install 'alphaclip-plugins[train]'") from e
    inside = {id(m) for m in lm.modules()}
    names = [n for n, m in model.named_modules()
             if id(m) in inside and isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in cfg.lora_targets]
    if not names:
        raise ValueError(f"model.lora_targets {cfg.lora_targets} match no linear layer of the language model; "
                         f"name its attention / MLP projections (e.g. q_proj, v_proj)")
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=names)
    return get_peft_model(model, config)


def prepare_model(model: nn.Module, kind: str, cfg: MLLMModelConfig) -> nn.Module:
    """Freeze what the recipe keeps, add LoRA, turn on gradient checkpointing; returns the model to train
    (a peft ``PeftModel`` around ``model`` with LoRA)."""
    p = parts(model, kind)
    model.requires_grad_(False)
    if cfg.train_lm == "lora":
        model = _lora(model, p.lm, cfg)  # its adapters train; peft leaves every other weight frozen
    for flag, modules in ((cfg.train_projector, p.projector), (cfg.train_lm == "full", [p.lm]),
                          (cfg.train_tower == "full", [p.tower]), (cfg.train_tower == "alpha", [p.alpha])):
        for module in modules if flag else []:
            module.requires_grad_(True)
    for param in p.extra:
        param.requires_grad_(cfg.train_projector)
    base = base_model(model)
    base.config.text_config.use_cache = False  # training needs no key-value cache (the export turns it back on)
    if cfg.grad_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def base_model(model: nn.Module) -> nn.Module:
    """The HF model inside a peft wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def param_groups(model: nn.Module, kind: str, cfg: MLLMOptimConfig) -> List[Dict[str, Any]]:
    """Trainable parameters in groups ``projector``, ``lm``, ``tower`` (each with and without decay).

    Weight decay applies to weights of two or more dimensions; norms, biases and query tokens never decay.
    """
    p = parts(base_model(model), kind)
    role: Dict[int, str] = {}
    for name, modules in (("tower", [p.tower]), ("lm", [p.lm]), ("projector", p.projector)):
        for module in modules:
            role.update({id(q): name for q in module.parameters()})
    ratio = {"projector": 1.0, "lm": cfg.lm_lr_ratio, "tower": cfg.tower_lr_ratio}
    groups: Dict[str, Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = role.get(id(param), "projector")  # BLIP-2's query tokens
        decay = param.ndim >= 2 and "query_tokens" not in name
        key = part if decay else f"{part}_no_decay"
        if key not in groups:
            lr = cfg.lr * ratio[part]
            groups[key] = {"name": key, "params": [], "lr": lr, "base_lr": lr,
                           "weight_decay": cfg.weight_decay if decay else 0.0}
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("no parameter requires a gradient: nothing would train")
    return list(groups.values())


def build_optimizer(model: nn.Module, kind: str, cfg: MLLMOptimConfig) -> torch.optim.AdamW:
    if len(cfg.betas) != 2:
        raise ValueError(f"optim.betas must hold two numbers; got {cfg.betas}")
    return torch.optim.AdamW(param_groups(model, kind, cfg), betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps)


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable weights only: frozen ones are re-read from ``model.path`` on resume (they never change)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    """Put checkpointed trainable weights back; the checkpoint must hold exactly the trainable set."""
    own = trainable_state(model)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"the checkpoint's trainable weights do not match this recipe's (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); resume with the recipe that wrote it")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in sd:
                param.copy_(sd[name])


def build_collator(model: nn.Module, kind: str, cfg: MLLMModelConfig) -> Tuple[Callable, Any]:
    """The collator of this model's batches and the processor (saved with the export)."""
    from transformers import AutoTokenizer

    import alphaclip_plugins.integrations.hf as ahf
    from alphaclip_plugins.integrations.hf.mllm_collator import RegionCaptionCollator

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.path, use_fast=True)
    if kind == "blip2":
        processor = ahf.AlphaCLIPImageProcessor(image_size=model.config.vision_config.image_size, mode=cfg.geometry)
        collator = RegionCaptionCollator(processor, tokenizer, model.config, prompt=cfg.prompt,
                                         max_length=cfg.max_length)
        return collator, (processor, tokenizer)
    processor = ahf.AlphaLlavaProcessor.from_model(model, tokenizer, mode=cfg.geometry)
    collator = ahf.RegionConversationCollator(processor, template=cfg.template, system=cfg.system,
                                              max_length=cfg.max_length)
    return collator, (processor,)
