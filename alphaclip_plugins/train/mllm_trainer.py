"""The MLLM fine-tuning loop: ``alphaclip train-mllm CONFIG.yaml`` (``torchrun ... -m alphaclip_plugins.train.mllm``).

The same loop as the region trainer's (``train/trainer.py``), on the same pieces: run folder and resume
rules (``rundir``), atomic checkpoints with RNG and data positions (``checkpointing``), DDP / FSDP2
(``distributed``), the progress bar, TensorBoard, ``metrics.jsonl`` and ``skipped.jsonl`` (``monitor``),
the schedule, clipping and autocast (``optim``), ``DataHealth`` / ``DataState`` (``loader``).

Loss: the next-token cross-entropy summed over every label token of the optimizer step, divided by the
number of label tokens of the whole step on all processes (counted before the step's first backward). So
the gradient does not depend on how the step is split: 2 processes with batch B each = 1 process with 2B
= accumulation of two B micro-batches, up to float rounding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .checkpointing import Checkpointer, full_state_dicts, load_fsdp_state, resume_run, save_run
from .distributed import DistEnv, is_fsdp, no_grad_sync, session, wrap
from .loader import DataHealth, DataState
from .mllm_config import MLLMTrainConfig
from .mllm_export import check_export_target, export_model
from .mllm_loader import make_loader
from .mllm_model import (build_collator, build_optimizer, load_model, load_trainable, model_kind, prepare_model,
                         trainable_state)
from .monitor import Monitor, count_skips, due, finish, log_skipped
from .optim import autocast, clip_grads, lr_factor, set_lr
from .rundir import claim_output

_MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "labels")


def train_mllm(cfg: MLLMTrainConfig, overwrite: bool = False) -> Path:
    """Train (or resume) the run ``cfg`` describes; returns the folder of the exported model.

    Args:
        overwrite: start over in ``cfg.output_dir`` and replace ``cfg.export.dir`` if it exists.

    Raises:
        RunDirError: ``output_dir`` holds an earlier run that ``cfg.resume`` does not say to continue, or
            ``export.dir`` holds a directory this run did not write (see :mod:`.rundir`, :mod:`.mllm_export`).
    """
    with session(cfg.device, cfg.distributed.backend, cfg.precision, cfg.distributed.strategy) as env:
        return _train(cfg, env, overwrite)


def build(cfg: MLLMTrainConfig, device: torch.device) -> Tuple[nn.Module, str, Any, Any]:
    """The model to train (frozen parts set, LoRA added) on ``device``, its kind, collator and processor parts."""
    base, kind = load_model(cfg.model)
    collator, processor = build_collator(base, kind, cfg.model)
    torch.manual_seed(cfg.seed)  # LoRA's initialisation
    return prepare_model(base, kind, cfg.model).to(device), kind, collator, processor


def _train(cfg: MLLMTrainConfig, env: DistEnv, overwrite: bool) -> Path:
    out = _prepare(cfg, env, overwrite)
    model, kind, collator, processor = build(cfg, env.device)
    # BLIP-2's Q-Former text layers and LLaVA's unread last tower layer get no gradient
    unused = kind == "blip2" or cfg.model.train_tower == "full"
    engine = wrap(model, env, cfg.distributed.strategy, find_unused=unused, blocks=_is_block(model))
    optimizer = build_optimizer(model, kind, cfg.optim)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_last)
    step, data, health = _resume(cfg, env, ckpt, model, optimizer, scaler, is_fsdp(engine))
    micro = cfg.micro_batch(env.world_size)
    batches = iter(make_loader(cfg.data, collator, micro, env.rank, env.world_size, cfg.seed, data))
    monitor = Monitor(out, cfg.steps, step, env.main, cfg.progress, cfg.tensorboard)
    trainable = [p for p in model.parameters() if p.requires_grad]

    while step < cfg.steps:
        lr = set_lr(optimizer, lr_factor(step, cfg.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio))
        group = [next(batches) for _ in range(cfg.accum_steps)]  # the whole step, to count its label tokens first
        for batch in group:
            data.advance(batch)
            count_skips(health, batch, monitor, step + 1)
        tokens = _all_sum(env, sum(label_tokens(b) for b in group))
        loss_sum = torch.zeros((), device=env.device)
        for i, batch in enumerate(group):
            with no_grad_sync(engine, skip=i < cfg.accum_steps - 1):
                with autocast(env.device.type, cfg.precision):
                    loss = token_loss_sum(engine, batch, env.device)
                # DDP / FSDP average gradients over processes: scale by world size to get the sum
                scaler.scale(loss * (env.world_size / tokens)).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        grad_norm = clip_grads(trainable, cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        log = step % cfg.log_every == 0 or step == cfg.steps
        scalars = {"loss": _all_sum(env, float(loss_sum)) / tokens, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens": int(tokens)} if log else {}
        monitor.step(step, cfg.batch_size, scalars, log)
        if due(step, cfg.save_every, cfg.steps):
            log_skipped(env, monitor, health)
            _save(cfg, env, ckpt, step, model, optimizer, scaler, data, health, is_fsdp(engine))

    finish(env, monitor, health, step, out / "skipped.jsonl")
    return export_model(cfg, env, model, kind, processor, is_fsdp(engine), overwrite)


def label_tokens(batch: Dict[str, Any]) -> int:
    """Label tokens of a micro-batch that carry loss (those that a next-token prediction targets)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def token_loss_sum(model: nn.Module, batch: Dict[str, Any], device: torch.device) -> torch.Tensor:
    """The cross-entropy summed over a micro-batch's label tokens (the model's mean times their number)."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in _MODEL_KEYS}
    out = model(**inputs)
    return out.loss.float() * label_tokens(batch)


def _all_sum(env: DistEnv, value: float) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t.item())


def _is_block(model: nn.Module):
    """FSDP2 shards the HF model's own unsplittable layers (decoder and encoder layers)."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return lambda m: type(m).__name__ in names


def _prepare(cfg: MLLMTrainConfig, env: DistEnv, overwrite: bool) -> Path:
    """Check ``output_dir`` and ``export.dir`` before any work, write the run's config; threads."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if not cfg.model.build:  # a model built from parts is written by _first_use
        model_kind(str(cfg.model.path))  # an unusable model directory fails before output_dir is taken
    check_export_target(cfg, overwrite)
    claim_output(env, out, cfg.to_dict(), cfg.resume, overwrite, setup=lambda: _first_use(cfg))
    return out


def _first_use(cfg: MLLMTrainConfig) -> None:
    """Rank 0 writes what is missing: synthetic conversations (``data.synthetic``), the model (``model.build``)."""
    from .mllm_synthetic import ensure_conversations

    ensure_conversations(cfg.data.train, cfg.data.synthetic)
    if cfg.model.build:
        from ..integrations.hf.tiny_llava import ensure_tiny_llava

        ensure_tiny_llava(cfg.model.path)


def _save(cfg, env, ckpt, step, model, optimizer, scaler, data, health, fsdp) -> None:
    """Only the trainable weights are saved: the frozen ones are re-read from ``model.path`` on resume."""
    if fsdp:
        full, optim_sd = full_state_dicts(model, optimizer, fsdp)
        model_sd = {n: full[n] for n, p in model.named_parameters() if p.requires_grad and n in full}  # rank 0 holds it
    else:
        model_sd, optim_sd = trainable_state(model), optimizer.state_dict()
    save_run(env, ckpt, step, model_sd, optim_sd, scaler, data, health, cfg.to_dict())


def _resume(cfg, env, ckpt, model, optimizer, scaler, fsdp: bool) -> Tuple[int, DataState, DataHealth]:
    """Load the latest checkpoint (or ``cfg.resume``'s): trainable weights, optimizer, scaler, RNG, data position."""

    def load(model_sd: Dict[str, Any], optim_sd: Dict[str, Any]) -> None:
        if fsdp:
            return load_fsdp_state(model, optimizer, model_sd, optim_sd, strict=False)
        load_trainable(model, model_sd)
        optimizer.load_state_dict(optim_sd)

    return resume_run(env, ckpt, cfg.resume, cfg.data.max_bad_fraction, scaler, load)
