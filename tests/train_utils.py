"""Helpers of the training tests: tiny configs, synthetic data on disk, training in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]

# A 32 px model with 8 px patches: a few milliseconds per step on a CPU.
TINY_SHAPES_DATA = dict(image_size=32, min_size=8, max_size=12, grid=8, num_shapes=3)


def tiny_config(tmp: Path, train: str, **over: Any) -> Dict[str, Any]:
    """A paper-recipe config (frozen text tower and logit scale) on the core "tiny" model."""
    cfg: Dict[str, Any] = {
        "model": {"name": "tiny"},
        "data": {"train": train, "num_workers": 0, "whole_image_ratio": 0.1},
        "optim": {"lr": 1e-3, "lr_ratio": 0.1, "warmup_steps": 2},
        "output_dir": str(tmp / "run"),
        "steps": 6, "batch_size": 8, "threads": 1, "log_every": 1, "eval_every": 0, "save_every": 0,
        "tensorboard": False, "progress": False,
    }
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def write_config(path: Path, cfg: Dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(config: Path, *overrides: str, nproc: int = 1, fault: Optional[str] = None,
              timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m alphaclip_plugins.train`` (through torchrun when ``nproc > 1``) in a fresh process;
    ``fault`` (``"step:N"``, ``"save:N"``, ``"saved:N"``) kills it there (``tests/kill_at.py``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(ROOT / "tests" / "kill_at.py"), fault] if fault else ["-m", "alphaclip_plugins.train"]
    cmd += [str(config), *overrides]
    return subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)
