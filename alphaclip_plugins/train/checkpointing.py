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
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..core.io import atomic_write, read_state_dict, save_safetensors

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
