"""The training loop.

One loop, in the order a reader expects: learning rate, autocast, forward, loss, backward (scaled),
clip, step, zero_grad, log, evaluate, checkpoint. Everything else (data, model setup, distributed
plumbing, checkpoint files) lives in its own module. Run it with ``alphaclip train CONFIG.yaml`` or, on
several GPUs, ``torchrun --nproc_per_node 8 -m alphaclip_plugins.train CONFIG.yaml``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..core.checkpoint import save_official
from ..core.factory import save_pretrained, tokenize
from ..core.model import AlphaCLIP
from ..core.processor import RegionProcessor
from .checkpointing import Checkpointer, full_state_dicts, load_fsdp_state, resume_run, save_run
from .config import TrainConfig
from .distributed import DistEnv, average_grads, barrier, is_fsdp, no_grad_sync, session, wrap
from .evaluate import decode_all, retrieval_top1
from .loader import DataHealth, DataState, data_format, ensure_synthetic, eval_records, make_loader
from .loss import ContrastiveLoss
from .modeling import Encoder, TextFeatureCache, build_model, distinct, merge_lora
from .monitor import Monitor, count_skips, due, finish, log_skipped
from .optim import DTYPES, autocast, build_optimizer, clip_grads, lr_factor, set_lr
from .rundir import claim_output

def train(cfg: TrainConfig, overwrite: bool = False) -> Path:
    """Train (or resume) a run described by ``cfg``; returns the folder of the exported model.

    Args:
        overwrite: start over in ``cfg.output_dir``, removing an earlier run's checkpoints and logs there.

    Raises:
        RunDirError: ``output_dir`` holds an earlier run that ``cfg.resume`` does not say to continue
            (see :mod:`.rundir`).
    """
    with session(cfg.device, cfg.distributed.backend, cfg.precision, cfg.distributed.strategy) as env:
        return _train(cfg, env, overwrite)


def _train(cfg: TrainConfig, env: DistEnv, overwrite: bool) -> Path:
    out = _prepare(cfg, env, overwrite)
    model = build_model(cfg, env.device)
    encoder = Encoder(model, cfg.model.train_text)
    engine = wrap(encoder, env, cfg.distributed.strategy)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
    loss_fn = ContrastiveLoss(cfg.loss.label_smoothing)
    micro = cfg.micro_batch(env.world_size)
    texts = None if cfg.model.train_text else TextFeatureCache(model, micro, cfg.text_cache_size)
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_last)
    step, data, health = _resume(cfg, env, ckpt, model, optimizer, scaler, is_fsdp(engine))
    image_size = model.cfg.vision.image_size
    batches = iter(make_loader(cfg.data, image_size, micro, env.rank, env.world_size, cfg.seed, data))
    evaluate = _evaluator(cfg, env, engine, model)
    monitor = Monitor(out, cfg.steps, step, env.main, cfg.progress, cfg.tensorboard)
    trainable = [p for p in model.parameters() if p.requires_grad]
    owned = {id(p) for p in encoder.parameters()}
    unowned = [p for p in trainable if id(p) not in owned]  # e.g. a trainable logit scale beside a vision-only DDP

    while step < cfg.steps:
        lr = set_lr(optimizer, lr_factor(step, cfg.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio))
        loss_sum = torch.zeros((), device=env.device)
        for i in range(cfg.accum_steps):
            batch = next(batches)
            data.advance(batch)
            count_skips(health, batch, monitor, step + 1)
            with no_grad_sync(engine, skip=i < cfg.accum_steps - 1):
                with autocast(env.device.type, cfg.precision):
                    image_features, text_features = _forward(engine, texts, batch, env.device)
                    loss = loss_fn(image_features, text_features, model.logit_scale.exp())
                scaler.scale(loss / cfg.accum_steps).backward()
            loss_sum += loss.detach() / cfg.accum_steps
        average_grads(env, unowned)
        scaler.unscale_(optimizer)
        grad_norm = clip_grads(trainable, cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if model.logit_scale.requires_grad:
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)  # at most 100, as in CLIP
        step += 1

        log = step % cfg.log_every == 0 or step == cfg.steps
        scalars = {"loss": float(loss_sum), "lr": lr, "grad_norm": float(grad_norm)} if log else {}
        monitor.step(step, cfg.batch_size, scalars, log)
        if evaluate is not None and due(step, cfg.eval_every, cfg.steps):
            monitor.eval(step, evaluate())
        if due(step, cfg.save_every, cfg.steps):
            log_skipped(env, monitor, health)
            _save(cfg, env, ckpt, step, model, optimizer, scaler, data, health, is_fsdp(engine))

    finish(env, monitor, health, step, out / "skipped.jsonl")
    return _export(cfg, env, model, out, is_fsdp(engine))


def _forward(engine: nn.Module, texts: Optional[TextFeatureCache], batch: Dict[str, Any], device: torch.device):
    """Normalised ``(image [B, D], text [B, D])`` features of one micro-batch."""
    pixels = batch["pixel_values"].to(device, non_blocking=True)
    alpha = batch["alpha"].to(device, non_blocking=True)
    if texts is not None:  # frozen text tower: cached features, no text forward
        image_features, _ = engine(pixels, alpha)
        return image_features, texts(batch["captions"])
    unique, inverse = distinct(batch["captions"])
    return engine(pixels, alpha, tokenize(unique).to(device), inverse.to(device))


def _prepare(cfg: TrainConfig, env: DistEnv, overwrite: bool) -> Path:
    """Check the config and ``output_dir`` (see :func:`.rundir.claim_output`), write synthetic data, seed, threads."""
    if cfg.distributed.strategy == "fsdp" and (cfg.model.lora_rank > 0 or cfg.model.train_text):
        raise ValueError("distributed.strategy=fsdp shards the vision tower only: use ddp with LoRA or train_text")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)

    def write_data() -> None:
        ensure_synthetic(cfg.data.train, cfg.data.synthetic)
        ensure_synthetic(cfg.data.eval, cfg.data.synthetic_eval)

    claim_output(env, out, cfg.to_dict(), cfg.resume, overwrite, write_data)
    return out


def _save(cfg, env, ckpt, step, model, optimizer, scaler, data, health, fsdp) -> None:
    model_sd, optim_sd = full_state_dicts(model, optimizer, fsdp)
    save_run(env, ckpt, step, model_sd, optim_sd, scaler, data, health, cfg.to_dict())


def _resume(cfg, env, ckpt, model, optimizer, scaler, fsdp: bool) -> Tuple[int, DataState, DataHealth]:
    """Load the latest checkpoint (or ``cfg.resume``'s path): weights, optimizer, scaler, RNG, data position."""

    def load(model_sd: Dict[str, Any], optim_sd: Dict[str, Any]) -> None:
        if fsdp:
            return load_fsdp_state(model, optimizer, model_sd, optim_sd)
        model.load_state_dict(model_sd, strict=True)
        optimizer.load_state_dict(optim_sd)

    tar = data_format(cfg.data.train, cfg.data.format) == "tar"  # the shard split depends on the world size
    return resume_run(env, ckpt, cfg.resume, cfg.data.max_bad_fraction, scaler, load, same_world=tar)


def _evaluator(cfg: TrainConfig, env: DistEnv, engine: nn.Module, model: AlphaCLIP) -> Optional[Callable[[], Dict]]:
    """A function running region-to-text retrieval on the evaluation set (on every rank, for FSDP)."""
    found = eval_records(cfg.data)
    if found is None:
        return None
    records, files = found
    processor = RegionProcessor(model.cfg.vision.image_size, cfg.data.geometry)
    pixels, alpha, captions, skipped = decode_all(records, processor, files)

    def run() -> Dict[str, float]:
        with autocast(env.device.type, cfg.precision):
            metrics = retrieval_top1(lambda p, a: engine(p, a)[0], lambda t: model.encode_text(t, normalize=True),
                                     pixels, alpha, captions, env.device)
        return {**metrics, "skipped": float(skipped)}

    return run


def _export(cfg: TrainConfig, env: DistEnv, model: AlphaCLIP, out: Path, fsdp: bool) -> Path:
    """Write the final model with ``save_pretrained`` (and the official layout on request)."""
    target = Path(cfg.export.dir) if cfg.export.dir else out / "final"
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.main:
            model = AlphaCLIP(model.cfg)
            model.load_state_dict(full)
    if env.main:
        model = merge_lora(model).to(DTYPES[cfg.export.dtype])
        # this run's export: replace an earlier one whole
        save_pretrained(model, target, overwrite=True, labels=cfg.export.labels or None)
        if cfg.export.official:
            save_official(model, target / "alphaclip_visual.pth")
    barrier(env)
    return target
