"""The training loop.

One loop, in the order a reader expects: learning rate, autocast, forward, loss, backward (scaled),
clip, step, zero_grad, log, evaluate, checkpoint. Everything else (data, model setup, distributed
plumbing, checkpoint files) lives in its own module. Run it with ``alphaclip train CONFIG.yaml`` or, on
several GPUs, ``torchrun --nproc_per_node 8 -m alphaclip_plugins.train CONFIG.yaml``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..core.checkpoint import save_official
from ..core.factory import save_pretrained, tokenize
from ..core.io import write_json
from ..core.model import AlphaCLIP
from ..core.processor import RegionProcessor
from .checkpointing import Checkpointer, rng_state, set_rng_state
from .config import TrainConfig
from .data import DataError
from .distributed import (DistEnv, all_gather_objects, average_grads, barrier, broadcast_object, cleanup, is_fsdp,
                          no_grad_sync, setup, wrap)
from .evaluate import decode_all, retrieval_top1
from .loader import DataHealth, DataState, data_format, ensure_synthetic, eval_records, make_loader
from .loss import ContrastiveLoss
from .modeling import Encoder, TextFeatureCache, build_model, distinct, merge_lora
from .monitor import Monitor
from .optim import build_optimizer, lr_factor, set_lr
from .rundir import RunDirError, check_reuse, clear_run

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def train(cfg: TrainConfig, overwrite: bool = False) -> Path:
    """Train (or resume) a run described by ``cfg``; returns the folder of the exported model.

    Args:
        overwrite: start over in ``cfg.output_dir``, removing an earlier run's checkpoints and logs there.

    Raises:
        RunDirError: ``output_dir`` holds an earlier run that ``cfg.resume`` does not say to continue
            (see :mod:`.rundir`).
    """
    env = setup(cfg.device, cfg.distributed.backend)
    threads = torch.get_num_threads()
    try:
        return _train(cfg, env, overwrite)
    finally:
        torch.set_num_threads(threads)  # `cfg.threads` applies to this run only
        cleanup()


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
            _count_skips(health, batch, monitor, step + 1)
            with no_grad_sync(engine, skip=i < cfg.accum_steps - 1):
                with _autocast(env.device.type, cfg.precision):
                    image_features, text_features = _forward(engine, texts, batch, env.device)
                    loss = loss_fn(image_features, text_features, model.logit_scale.exp())
                scaler.scale(loss / cfg.accum_steps).backward()
            loss_sum += loss.detach() / cfg.accum_steps
        average_grads(env, unowned)
        scaler.unscale_(optimizer)
        grad_norm = _clip(trainable, cfg.optim.grad_clip)
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
        if evaluate is not None and _due(step, cfg.eval_every, cfg.steps):
            monitor.eval(step, evaluate())
        if _due(step, cfg.save_every, cfg.steps):
            _log_skipped(env, monitor, health)
            _save(cfg, env, ckpt, step, model, optimizer, scaler, data, health, is_fsdp(engine))

    _log_skipped(env, monitor, health)
    merged = DataHealth.merged(all_gather_objects(env, health.state_dict()), cfg.data.max_bad_fraction)
    monitor.message(f"done: {step} steps; {merged.summary(out / 'skipped.jsonl')}")
    monitor.close()
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


def _autocast(device_type: str, precision: str):
    dtype = _DTYPES[precision] if precision != "fp32" else None
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def _clip(params: List[nn.Parameter], max_norm: Optional[float]) -> torch.Tensor:
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _prepare(cfg: TrainConfig, env: DistEnv, overwrite: bool) -> Path:
    """Check the config and ``output_dir``, write synthetic data and the run's config (rank 0), seed and threads."""
    if cfg.distributed.strategy == "fsdp" and (cfg.model.lora_rank > 0 or cfg.model.train_text):
        raise ValueError("distributed.strategy=fsdp shards the vision tower only: use ddp with LoRA or train_text")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    problem = broadcast_object(env, check_reuse(out, cfg.to_dict(), cfg.resume, overwrite) if env.main else None)
    if problem:
        raise RunDirError(problem)
    if env.main:
        if overwrite:
            clear_run(out)
        ensure_synthetic(cfg.data.train, cfg.data.synthetic)
        ensure_synthetic(cfg.data.eval, cfg.data.synthetic_eval)
        write_json(cfg.to_dict(), out / "config.json")
        Checkpointer(out / "checkpoints").clean_partial()
    barrier(env)
    return out


def _state_dicts(model: AlphaCLIP, optimizer: torch.optim.Optimizer, fsdp: bool) -> Tuple[Dict, Dict]:
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _count_skips(health: DataHealth, batch: Dict[str, Any], monitor: Monitor, step: int) -> None:
    """Count a micro-batch's skipped samples; a run that stops on them lists them (this process's) first."""
    try:
        health.update(batch, step)
    except DataError:
        monitor.skipped(health.take_pending())
        raise


def _log_skipped(env: DistEnv, monitor: Monitor, health: DataHealth) -> None:
    """Every rank's samples skipped since the last call go to ``skipped.jsonl`` (before each checkpoint)."""
    gathered = [item for items in all_gather_objects(env, health.take_pending()) for item in items]
    monitor.skipped(sorted(gathered, key=lambda item: item[0]))  # in step order, rank order within a step


def _save(cfg, env, ckpt, step, model, optimizer, scaler, data, health, fsdp) -> None:
    """Every rank contributes its data position, RNG state and data health; rank 0 writes."""
    ranks = all_gather_objects(env, {"data": data.state_dict(), "rng": rng_state(), "health": health.state_dict()})
    model_sd, optim_sd = _state_dicts(model, optimizer, fsdp)
    if env.main:
        state = {"scaler": scaler.state_dict(), "ranks": ranks, "world_size": env.world_size,
                 "health": health.state_dict(), "config": cfg.to_dict()}
        ckpt.write(step, model_sd, optim_sd, state)
    barrier(env)


def _resume(cfg, env, ckpt, model, optimizer, scaler, fsdp: bool) -> Tuple[int, DataState, DataHealth]:
    """Load the latest checkpoint (or ``cfg.resume``'s path): weights, optimizer, scaler, RNG, data position."""
    health = DataHealth(cfg.data.max_bad_fraction)
    if cfg.resume is False:
        return 0, DataState(), health
    path = None if cfg.resume in (True, "auto") else Path(str(cfg.resume))
    found = ckpt.read_latest(path) if env.main else None
    folder = broadcast_object(env, found[0] if found else None)
    if folder is None:
        return 0, DataState(), health
    _, model_sd, optim_sd, state = found if env.main else (None, *ckpt.read(folder))
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(model_sd, strict=True)
        optimizer.load_state_dict(optim_sd)
    scaler.load_state_dict(state["scaler"])
    ranks = state["ranks"]
    if state["world_size"] != env.world_size:
        if data_format(cfg.data.train, cfg.data.format) == "tar":
            raise DataError(f"{folder} was written by {state['world_size']} processes; resume tar-shard training "
                            f"with the same number (the shard split depends on it)")
        ranks = [ranks[0]] * env.world_size  # map-style positions are global: any world size continues them
    set_rng_state(ranks[env.rank]["rng"])
    health.load_state_dict(_rank_health(state, env))
    return int(state["step"]), DataState.from_state(ranks[env.rank]["data"]), health


def _rank_health(state: Dict[str, Any], env: DistEnv) -> Dict[str, Any]:
    """This rank's saved data health; after a change of world size rank 0 carries every old rank's counts."""
    saved = [r["health"] for r in state["ranks"] if "health" in r] or [state["health"]]
    if len(saved) == env.world_size:
        return saved[env.rank]
    return DataHealth.merged(saved if env.main else [], 0.0).state_dict()


def _evaluator(cfg: TrainConfig, env: DistEnv, engine: nn.Module, model: AlphaCLIP) -> Optional[Callable[[], Dict]]:
    """A function running region-to-text retrieval on the evaluation set (on every rank, for FSDP)."""
    found = eval_records(cfg.data)
    if found is None:
        return None
    records, files = found
    processor = RegionProcessor(model.cfg.vision.image_size, cfg.data.geometry)
    pixels, alpha, captions, skipped = decode_all(records, processor, files)

    def run() -> Dict[str, float]:
        with _autocast(env.device.type, cfg.precision):
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
        model = merge_lora(model).to(_DTYPES[cfg.export.dtype])
        # this run's export: replace an earlier one whole
        save_pretrained(model, target, overwrite=True, labels=cfg.export.labels or None)
        if cfg.export.official:
            save_official(model, target / "alphaclip_visual.pth")
    barrier(env)
    return target
