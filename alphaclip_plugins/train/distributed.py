"""torch.distributed for training: process setup, the feature gather of the contrastive loss, DDP/FSDP wrapping.

A process started by ``torchrun`` or ``accelerate launch --multi_gpu`` (``RANK``/``WORLD_SIZE`` in the
environment; on a CPU-only machine accelerate runs torchrun too, with gloo) joins the process group; a plain
``python`` process is rank 0 of 1 and runs the same code without any collective call. The run's config stays
the one source of its settings: launcher flags it would not follow are refused (:func:`check_launcher`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


class LaunchError(ValueError):
    """The launcher's environment contradicts the run's config, or starts processes this run cannot join."""


# accelerate's --mixed_precision (ACCELERATE_MIXED_PRECISION, "no" when the flag is not given) -> our precision
_ACCELERATE_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def check_launcher(precision: Optional[str] = None, strategy: Optional[str] = None) -> None:
    """Refuse an ``accelerate launch`` whose settings this run would not follow (the config decides: it is saved
    with the run and checked on resume, so a different launcher flag is an error, not an override).

    * ``--cpu`` with several processes: accelerate starts one process unless it runs under ``mpirun``; neither
      joins a torch process group here, so the run would silently be one process.
    * ``--mixed_precision`` (``ACCELERATE_MIXED_PRECISION``, ``no`` when not given) differs from ``precision``.
    * ``--use_fsdp`` with ``distributed.strategy`` other than ``fsdp``; ``--use_deepspeed`` (not offered).

    Raises:
        LaunchError: one of the above, saying which flag or setting to change.
    """
    if _env_flag("ACCELERATE_USE_CPU") and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        raise LaunchError(
            "accelerate launch --cpu with several processes does not start a torch process group (one process, or "
            "mpirun ranks): launch with accelerate launch --multi_gpu --num_processes N (torchrun; gloo on CPU) "
            "or torchrun --nproc_per_node N")
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if precision is not None and asked is not None and _ACCELERATE_PRECISION.get(asked.lower()) != precision:
        flag = {v: k for k, v in _ACCELERATE_PRECISION.items()}[precision]
        ours = _ACCELERATE_PRECISION.get(asked.lower())
        fix = f"set precision={ours} in the config" if ours else "this trainer runs fp32 (no), bf16 or fp16 only"
        raise LaunchError(f"accelerate launch asks for mixed precision {asked!r} (--mixed_precision; 'no' when not "
                          f"given) but the config has precision={precision}: launch with --mixed_precision {flag}, "
                          f"or {fix}")
    if strategy is not None and _env_flag("ACCELERATE_USE_FSDP") and strategy != "fsdp":
        raise LaunchError(f"accelerate launch --use_fsdp but the config has distributed.strategy={strategy}: set "
                          "distributed.strategy=fsdp (this trainer shards with its own FSDP2 wrapping, accelerate's "
                          "FSDP options are not read), or launch with --multi_gpu")
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise LaunchError("accelerate launch --use_deepspeed: this trainer has no DeepSpeed; launch with --multi_gpu "
                          "and distributed.strategy=ddp or fsdp")


def setup(device: str = "auto", backend: str = "auto") -> DistEnv:
    """Join the process group when launched by torchrun, and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank, world, local, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "auto", backend: str = "auto", precision: Optional[str] = None,
            strategy: Optional[str] = None) -> Iterator[DistEnv]:
    """A training run's process setup: :func:`check_launcher` (with the run's ``precision`` and ``strategy``) and
    :func:`setup` on entry; on exit the process group is left and torch's CPU thread count restored (a run's
    ``threads`` setting applies to that run only)."""
    check_launcher(precision, strategy)
    threads = torch.get_num_threads()
    try:
        yield setup(device, backend)
    finally:
        torch.set_num_threads(threads)
        cleanup()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_gather_objects(env: DistEnv, obj: Any) -> List[Any]:
    """Every rank's ``obj`` (small Python values), in rank order."""
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, in rank order, with gradients flowing to this rank's rows only.

    Every rank computes the loss over the global batch; rank ``r`` differentiates it through its own
    rows ``x`` (the other rows are constants). Summed over ranks these partial gradients are the
    single-process gradient; DDP and FSDP average instead of summing, so this rank's gradient is scaled
    by the world size here. The logit scale, replicated on every rank, is not scaled: the average of its
    identical per-rank gradients is already right.

    Args:
        x: ``[B, D]`` local rows (any dtype); the batch size must be equal on all ranks.

    Returns:
        ``[world_size * B, D]``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = _ScaleGrad.apply(x, float(world)) if x.requires_grad else x
    return torch.cat(parts)


def average_grads(env: DistEnv, params: List[nn.Parameter]) -> None:
    """All-reduce-average the gradients of parameters that no DDP/FSDP wrapper owns."""
    if not env.distributed:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= env.world_size


def wrap(module: nn.Module, env: DistEnv, strategy: str = "ddp", find_unused: bool = False,
         blocks: Optional[Callable[[nn.Module], bool]] = None) -> nn.Module:
    """Wrap the trainable module for data parallelism (unchanged in a single process).

    ``ddp``: replicas with gradients averaged in buckets (``find_unused``: some trainable parameters may get
    no gradient in a step). ``fsdp``: every residual block (``blocks`` tells which modules are blocks) with a
    trainable parameter and the module itself are sharded across ranks (FSDP2 ``fully_shard``), for models
    that do not fit one device.
    """
    if not env.distributed:
        return module
    if strategy == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from ..core.transformer import ResidualAttentionBlock

        is_block = blocks or (lambda m: isinstance(m, ResidualAttentionBlock))
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for block in [m for m in module.modules() if is_block(m)]:
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    raise ValueError(f"distributed.strategy must be 'ddp' or 'fsdp'; got {strategy!r}")


@contextlib.contextmanager
def no_grad_sync(module: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of a non-final accumulation micro-step (``skip=True``)."""
    if not skip:
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def is_fsdp(module: Optional[nn.Module]) -> bool:
    return module is not None and type(module).__name__.startswith("FSDP")
