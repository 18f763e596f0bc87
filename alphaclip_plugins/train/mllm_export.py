"""The end of a ``train-mllm`` run: an HF directory of the fine-tuned model, LoRA merged, processor beside it.

The directory (``export.dir``, default ``<output_dir>/final``) loads with
``LlavaForConditionalGeneration.from_pretrained`` (after ``import alphaclip_plugins.integrations.hf``, which
registers the Alpha tower) or ``AlphaBlip2ForConditionalGeneration.from_pretrained``; the tokenizer and the
4-channel processor are saved in it. It is written under a temporary name and renamed into place, so a
killed export leaves no half directory. A directory that this run did not write (no marker naming this
run's ``output_dir``) is never replaced without ``--overwrite``; the check runs before training starts.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .distributed import DistEnv, barrier
from .optim import DTYPES
from .rundir import RunDirError

MARKER = ".alphaclip-train-mllm.json"  # in an export: which run wrote it


def export_dir(cfg: Any) -> Path:
    return Path(cfg.export.dir) if cfg.export.dir else Path(cfg.output_dir) / "final"


def _written_by_this_run(target: Path, cfg: Any) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("output_dir") == str(Path(cfg.output_dir).resolve())


def check_export_target(cfg: Any, overwrite: bool) -> None:
    """Refuse, before training, an ``export.dir`` that exists and was not written by this run.

    Raises:
        RunDirError: the directory exists, is not this run's earlier export, and ``overwrite`` is off.
    """
    target = export_dir(cfg)
    if target.exists() and not overwrite and not _written_by_this_run(target, cfg):
        raise RunDirError(f"export.dir {target} exists and was not written by this run; pass --overwrite to replace "
                          f"it or set export.dir to a new directory")


def _merged(model: nn.Module) -> nn.Module:
    """The HF model with LoRA adapters folded into its weights (the model itself when it has none)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def save_export(model: nn.Module, processor: Sequence[Any], target: Path, cfg: Any) -> Path:
    """Write ``model`` (LoRA merged, in ``export.dtype``) and its processor parts to ``target`` atomically."""
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    hf = _merged(model).to(DTYPES[cfg.export.dtype])
    if getattr(hf.config, "use_cache", None) is False:
        hf.config.use_cache = True  # training turned it off for gradient checkpointing
    hf.save_pretrained(tmp)
    for part in processor:
        part.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"output_dir": str(Path(cfg.output_dir).resolve())}))
    if target.exists():
        trash = target.parent / f".trash-{target.name}-{os.getpid()}"
        os.replace(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, target)
    return target


def export_model(cfg: Any, env: DistEnv, model: nn.Module, kind: str, processor: Sequence[Any], fsdp: bool,
                 overwrite: bool) -> Path:
    """Export the trained model (rank 0 writes; under FSDP the trainable weights are gathered first)."""
    target = export_dir(cfg)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.main:
            from .mllm_model import load_model, load_trainable, prepare_model

            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            fresh = prepare_model(*load_model(cfg.model), cfg.model)
            load_trainable(fresh, {n: v for n, v in full.items() if n in trainable})
            model = fresh
    if env.main:
        model = model.to("cpu")
        save_export(model, processor, target, cfg)
    barrier(env)
    return target
