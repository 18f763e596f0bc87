"""A run's ``output_dir``: whether a new run may use it, and starting over in it.

An earlier run leaves ``config.json`` (its resolved config), ``checkpoints/``, ``metrics.jsonl``,
``skipped.jsonl`` and ``tensorboard/`` there. A new run into the same folder continues the earlier one
only when their configs agree (``resume: auto``, the default) or when the user says so (``resume: true``
or a checkpoint path); ``resume: false`` and ``--overwrite`` are the two ways to start at step 0, and only
``--overwrite`` may do so where an earlier run left its files.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

from ..core.io import write_json
from .checkpointing import Checkpointer
from .distributed import DistEnv, barrier, broadcast_object

RUN_FILES = ("config.json", "checkpoints", "metrics.jsonl", "skipped.jsonl", "tensorboard")
# Settings that change neither the trained weights nor what is measured: a resume may change them freely.
UNCOMPARED = ("resume", "progress", "tensorboard", "threads", "log_every", "save_every", "keep_last")
_UNSET = object()


class RunDirError(ValueError):
    """The run would continue, or write over, an earlier run in ``output_dir`` without being told to."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (lists stay values, empty mappings vanish)."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """``"key: old -> new"`` for every compared setting (dotted keys) that differs, sorted by key."""
    a, b = flatten(old), flatten(json.loads(json.dumps(new)))  # the same JSON types on both sides
    changed = sorted(k for k in set(a) | set(b) if k not in UNCOMPARED and a.get(k, _UNSET) != b.get(k, _UNSET))
    show = lambda d, k: "(unset)" if k not in d else json.dumps(d[k])  # noqa: E731
    return [f"{k}: {show(a, k)} -> {show(b, k)}" for k in changed]


def earlier_run(out: Path) -> List[str]:
    """The files of an earlier run in ``out`` (empty when there are none)."""
    return [n for n in RUN_FILES if (out / n).exists()]


def check_reuse(out: Path, config: Mapping[str, Any], resume: Union[bool, str], overwrite: bool) -> Optional[str]:
    """Why this run may not use ``out`` as asked (a message for :class:`RunDirError`), or None when it may.

    Args:
        config: this run's resolved config (``TrainConfig.to_dict()``).
        resume: ``"auto"``, True, False or a checkpoint path (the config's ``resume``).
        overwrite: the run starts over in ``out``, removing an earlier run's files.
    """
    if overwrite:
        if resume is True or (isinstance(resume, str) and resume != "auto"):
            return f"--overwrite starts the run in {out} over, so it cannot also resume (resume={resume}); drop one"
        return None
    found = earlier_run(out)
    if not found:
        return None
    if resume is False:
        return (f"{out} holds an earlier run ({', '.join(found)}) and resume=false would start a new one over it; "
                f"pass --overwrite to replace it, resume=auto to continue it, or choose another output_dir")
    if resume != "auto" or not (out / "config.json").is_file():
        return None  # resume=true or a checkpoint path: the user asked to continue
    try:
        old = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"cannot read the earlier run's {out / 'config.json'} ({e}); pass resume=true or --overwrite"
    changes = config_changes(old, config) if isinstance(old, dict) else ["(the saved config is not a mapping)"]
    if not changes:
        return None
    return (f"{out} holds a run with a different config ({'; '.join(changes)}); pass resume=true to continue it "
            f"with the new settings, --overwrite to start over there, or choose another output_dir")


def clear_run(out: Path) -> None:
    """Remove an earlier run's files from ``out`` (each renamed away first, so none is left half-deleted).

    Only the files a run writes go; anything else in ``out`` (data, the exported model) stays.
    """
    for name in earlier_run(out):
        trash = out / f".trash-{name}-{os.getpid()}"
        os.replace(out / name, trash)
        shutil.rmtree(trash) if trash.is_dir() else trash.unlink()


def claim_output(env: DistEnv, out: Path, config: Mapping[str, Any], resume: Union[bool, str], overwrite: bool,
                 setup: Optional[Callable[[], None]] = None) -> None:
    """Take ``out`` for this run: check it may (every rank raises the same :class:`RunDirError`), then on rank 0
    start over there with ``overwrite``, run ``setup`` (e.g. write synthetic data), write ``config.json`` and
    remove what a killed checkpoint write left; the other ranks wait."""
    problem = broadcast_object(env, check_reuse(out, config, resume, overwrite) if env.main else None)
    if problem:
        raise RunDirError(problem)
    if env.main:
        if overwrite:
            clear_run(out)
        if setup is not None:
            setup()
        write_json(dict(config), out / "config.json")
        Checkpointer(out / "checkpoints").clean_partial()
    barrier(env)
