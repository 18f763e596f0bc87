"""Training checkpoints: atomic, pruned to the last N, and enough to resume a run exactly.

A checkpoint is a folder ``step_00001000/`` holding

* ``model.safetensors``: every model weight;
* ``optimizer.safetensors``: the optimizer's tensors (AdamW moments and step counts);
* ``state.pt``: everything else (step, param groups, gradient scaler, RNG states, data positions of every
  rank, counters), plain Python values and tensors only, read back with ``weights_only=True``.

The folder is written under a temporary name and renamed into place, so a run killed at any moment
leaves either a complete checkpoint or none: a ``step_*`` folder is never partial. Pruned folders are
renamed away before deletion for the same reason.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..core.io import atomic_write, read_state_dict, save_safetensors
from .data import DataError
from .distributed import DistEnv, all_gather_objects, barrier, broadcast_object
from .loader import DataHealth, DataState

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> Dict[str, Any]:
    """This process's RNG states, as tensors and plain values."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def split_optimizer_state(sd: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Optimizer ``state_dict`` -> (tensors for safetensors, the rest)."""
    tensors: Dict[str, torch.Tensor] = {}
    layout: List[Tuple[Any, List[str], Dict[str, Any]]] = []
    for pid, st in sd["state"].items():
        names = [k for k, v in st.items() if isinstance(v, torch.Tensor)]
        for k in names:
            tensors[f"{pid}/{k}"] = st[k]
        layout.append((pid, names, {k: v for k, v in st.items() if k not in names}))
    return tensors, {"param_groups": sd["param_groups"], "layout": layout}


def join_optimizer_state(tensors: Dict[str, torch.Tensor], rest: Dict[str, Any]) -> Dict[str, Any]:
    state = {pid: {**{k: tensors[f"{pid}/{k}"] for k in names}, **other} for pid, names, other in rest["layout"]}
    return {"state": state, "param_groups": rest["param_groups"]}


class Checkpointer:
    """Writes, finds and prunes checkpoints in ``directory`` (only rank 0 calls :meth:`write`).

    Args:
        keep_last: complete checkpoints kept; older ones are deleted after each save.
    """

    def __init__(self, directory: Path | str, keep_last: int = 3):
        self.directory = Path(directory)
        self.keep_last = max(keep_last, 1)

    def checkpoints(self) -> List[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())

    def clean_partial(self) -> None:
        """Remove folders of writes or deletions that a killed run left behind."""
        if self.directory.is_dir():
            for p in self.directory.iterdir():
                if p.name.startswith((".tmp-", ".trash-")):
                    shutil.rmtree(p, ignore_errors=True)

    def write(
        self, step: int, model_sd: Dict[str, torch.Tensor], optim_sd: Dict[str, Any], state: Dict[str, Any]
    ) -> Path:
        """Write one checkpoint atomically, then prune; returns its folder."""
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".tmp-step_{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_safetensors(model_sd, tmp / "model.safetensors", metadata={"format": "alphaclip", "step": str(step)})
        optim_tensors, optim_rest = split_optimizer_state(optim_sd)
        save_safetensors(optim_tensors, tmp / "optimizer.safetensors")
        atomic_write(tmp / "state.pt", lambda f: torch.save({**state, "optimizer": optim_rest, "step": step}, f))
        _fsync_dir(tmp)
        if final.exists():  # the same step written again (e.g. after a resume): replace it
            os.replace(final, self.directory / f".trash-{final.name}-{os.getpid()}")
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        self.prune()
        return final

    def prune(self) -> None:
        for old in self.checkpoints()[: -self.keep_last]:
            trash = self.directory / f".trash-{old.name}-{os.getpid()}"
            os.replace(old, trash)  # atomic: the folder is gone as a checkpoint before any file is deleted
            shutil.rmtree(trash, ignore_errors=True)

    def read(self, path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Dict[str, Any]]:
        """(model weights, optimizer state dict, training state) of one checkpoint."""
        model_sd = read_state_dict(path / "model.safetensors")
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        optim_sd = join_optimizer_state(read_state_dict(path / "optimizer.safetensors"), state.pop("optimizer"))
        return model_sd, optim_sd, state

    def read_latest(self, path: Optional[Path] = None):
        """The newest readable checkpoint (or ``path``): ``(folder, model, optimizer, state)``, or None."""
        candidates = [Path(path)] if path is not None else list(reversed(self.checkpoints()))
        for folder in candidates:
            try:
                return (folder, *self.read(folder))
            except Exception as e:  # a damaged disk, not a partial write: fall back to the one before
                if path is not None:
                    raise
                warnings.warn(f"skipping unreadable checkpoint {folder}: {type(e).__name__}: {e}")
        return None


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> Tuple[Dict, Dict]:
    """The model's and optimizer's whole state dicts (gathered to CPU from every rank under FSDP)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_fsdp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_sd: Dict[str, Any],
                    optim_sd: Dict[str, Any], strict: bool = True) -> None:
    """Put whole (unsharded) state dicts back into an FSDP-sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True, strict=strict))


def save_run(env: DistEnv, ckpt: Checkpointer, step: int, model_sd: Dict[str, torch.Tensor], optim_sd: Dict[str, Any],
             scaler: Any, data: DataState, health: DataHealth, config: Dict[str, Any]) -> None:
    """Save a run's checkpoint: every rank contributes its data position, RNG state and data health; rank 0 writes."""
    ranks = all_gather_objects(env, {"data": data.state_dict(), "rng": rng_state(), "health": health.state_dict()})
    if env.main:
        state = {"scaler": scaler.state_dict(), "ranks": ranks, "world_size": env.world_size,
                 "health": health.state_dict(), "config": config}
        ckpt.write(step, model_sd, optim_sd, state)
    barrier(env)


def read_run(env: DistEnv, ckpt: Checkpointer, resume: Union[bool, str]):
    """The checkpoint a run continues from (``resume``: auto / true = the latest, false = none, or a folder):
    ``(folder, model, optimizer, state)`` on every rank (rank 0 picks it), or None."""
    if resume is False:
        return None
    path = None if resume in (True, "auto") else Path(str(resume))
    found = ckpt.read_latest(path) if env.main else None
    folder = broadcast_object(env, found[0] if found else None)
    if folder is None:
        return None
    return found if env.main else (folder, *ckpt.read(folder))


def restore_run(env: DistEnv, folder: Path, state: Dict[str, Any], scaler: Any, health: DataHealth,
                same_world: bool = False) -> Tuple[int, DataState]:
    """Put a checkpoint's scaler, RNG and data health back; returns its step and this rank's data position.

    Args:
        same_world: the data position depends on the number of processes (tar shards): refuse another one.
    """
    scaler.load_state_dict(state["scaler"])
    ranks = state["ranks"]
    if state["world_size"] != env.world_size:
        if same_world:
            raise DataError(f"{folder} was written by {state['world_size']} processes; resume tar-shard training "
                            f"with the same number (the shard split depends on it)")
        ranks = [ranks[0]] * env.world_size  # map-style positions are global: any world size continues them
    set_rng_state(ranks[env.rank]["rng"])
    health.load_state_dict(_rank_health(state, env))
    return int(state["step"]), DataState.from_state(ranks[env.rank]["data"])


def resume_run(env: DistEnv, ckpt: Checkpointer, resume: Union[bool, str], max_bad_fraction: float, scaler: Any,
               load: Callable[[Dict[str, Any], Dict[str, Any]], None],
               same_world: bool = False) -> Tuple[int, DataState, DataHealth]:
    """Continue from the checkpoint ``resume`` names (see :func:`read_run`): ``load(model_sd, optim_sd)`` puts
    the weights and optimizer back, then the scaler, RNG and data health; returns ``(step, data, health)``
    (step 0 and fresh state where there is no checkpoint)."""
    health = DataHealth(max_bad_fraction)
    found = read_run(env, ckpt, resume)
    if found is None:
        return 0, DataState(), health
    folder, model_sd, optim_sd, state = found
    load(model_sd, optim_sd)
    step, data = restore_run(env, folder, state, scaler, health, same_world)
    return step, data, health


def _rank_health(state: Dict[str, Any], env: DistEnv) -> Dict[str, Any]:
    """This rank's saved data health; after a change of world size rank 0 carries every old rank's counts."""
    saved = [r["health"] for r in state["ranks"] if "health" in r] or [state["health"]]
    if len(saved) == env.world_size:
        return saved[env.rank]
    return DataHealth.merged(saved if env.main else [], 0.0).state_dict()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
