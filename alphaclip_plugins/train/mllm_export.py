"""The end of a ``train-mllm`` run: an HF directory of the fine-tuned model, LoRA merged, processor beside it.

The directory (``export.dir``, default ``<output_dir>/final``) loads with
``LlavaForConditionalGeneration.from_pretrained`` (after ``import alphaclip_plugins.integrations.hf``, which
registers the Alpha tower) or ``AlphaBlip2ForConditionalGeneration.from_pretrained``; the tokenizer and the
4-channel processor are saved in it, in files that transformers 4.37, 4.57 and 5.x all read to the same
weights whichever of them wrote it (:func:`save_portable`). It is written under a temporary name and renamed
into place, so a killed export leaves no half directory. A directory that this run did not write (no marker
naming this run's ``output_dir``) is never replaced without ``--overwrite``; the check runs before training starts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..core.io import atomic_directory
from .distributed import DistEnv, barrier
from .optim import DTYPES
from .rundir import RunDirError

MARKER = ".alphaclip-train-mllm.json"  # in an export: which run wrote it


def export_dir(cfg: Any) -> Path:
    return Path(cfg.export.dir) if cfg.export.dir else Path(cfg.output_dir) / "final"


def original_dir(cfg: Any) -> Path:
    """Where ``export.original_llava`` writes: beside the export, named so that LLaVA's loader sees "llava"."""
    target = export_dir(cfg)
    return target.parent / f"{target.name}-llava"


def mark(folder: Path, cfg: Any) -> None:
    """Note in an export that this run (its ``output_dir``) wrote it: a later run of it may replace it."""
    (folder / MARKER).write_text(json.dumps({"output_dir": str(Path(cfg.output_dir).resolve())}))


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
    targets = [export_dir(cfg)] + ([original_dir(cfg)] if cfg.export.original_llava else [])
    for target in targets:
        if target.exists() and not overwrite and not _written_by_this_run(target, cfg):
            raise RunDirError(f"{target} exists and was not written by this run; pass --overwrite to replace it or "
                              f"set export.dir to a new directory")


def _merged(model: nn.Module) -> nn.Module:
    """The HF model with LoRA adapters folded into its weights (the model itself when it has none)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _portable_weights(folder: Path, rules: Any) -> None:
    """Rename saved weights to the layout every transformers release reads (``compat.portable_key`` with ``rules``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ..integrations.hf.compat import portable_key

    index = folder / "model.safetensors.index.json"
    files = sorted(set(_read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    for name in files:
        with safe_open(str(folder / name), "pt") as f:
            metadata = f.metadata()
        tensors, mode = load_file(str(folder / name)), (folder / name).stat().st_mode
        save_file({portable_key(k, rules): v for k, v in tensors.items()}, str(folder / name), metadata=metadata)
        os.chmod(folder / name, mode)  # save_file creates the file owner-only; keep save_pretrained's mode
    if index.is_file():
        table = _read_json(index)
        table["weight_map"] = {portable_key(k, rules): v for k, v in table["weight_map"].items()}
        _write_json(index, table)


def _portable_files(folder: Path) -> None:
    """Make the config, tokenizer and processor files that 5.x writes readable by 4.37-4.57 as well.

    * ``tokenizer_class``: 5.x's generic ``TokenizersBackend`` is ``PreTrainedTokenizerFast`` on every release;
      a chat template saved beside it (``chat_template.jinja``) also goes into ``tokenizer_config.json``
      (4.37 reads it there only), and a list of ``extra_special_tokens`` becomes ``additional_special_tokens``;
    * ``preprocessor_config.json``: the image processor alone, which 4.x's ``AutoProcessor`` loads (5.x nests it
      in ``processor_config.json``);
    * the LM's ``rope_theta`` (4.x) beside 5.x's ``rope_parameters``.
    """
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file():
        tok = _read_json(tok_path)
        if tok.get("tokenizer_class") == "TokenizersBackend":
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        if "chat_template" not in tok and (folder / "chat_template.jinja").is_file():
            tok["chat_template"] = (folder / "chat_template.jinja").read_text()
        if isinstance(tok.get("extra_special_tokens"), list):
            extra = tok.pop("extra_special_tokens")
            tok["additional_special_tokens"] = list(dict.fromkeys(tok.get("additional_special_tokens", []) + extra))
        _write_json(tok_path, tok)
    proc_path, image_path = folder / "processor_config.json", folder / "preprocessor_config.json"
    if proc_path.is_file() and not image_path.is_file():
        nested = _read_json(proc_path).get("image_processor")
        if isinstance(nested, dict):
            _write_json(image_path, nested)
    config = _read_json(folder / "config.json")
    text = config.get("text_config") or {}
    rope = text.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in text:
        text["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            text.setdefault("rope_scaling", rope)
        _write_json(folder / "config.json", config)


def save_portable(model: nn.Module, processor: Sequence[Any], folder: Path) -> None:
    """``save_pretrained`` of ``model`` and its processor parts into ``folder``, in files that transformers 4.37,
    4.57 and 5.x all load (``LlavaForConditionalGeneration`` / ``AutoProcessor`` / ``AutoTokenizer``) to the same
    weights, whichever of them writes: LLaVA and BLIP-2 weights in 4.37's key layout (later releases convert it),
    and the tokenizer and processor files each release looks for (:func:`_portable_files`)."""
    model.save_pretrained(folder)
    for part in processor:
        part.save_pretrained(folder)
    from ..integrations.hf.compat import PORTABLE_KEYS

    model_type = getattr(model.config, "model_type", None)
    if model_type in PORTABLE_KEYS:
        _portable_weights(folder, PORTABLE_KEYS[model_type])
    if model_type == "llava":
        _llava_token_counts(folder, model.config, processor)
    _portable_files(folder)


def _llava_token_counts(folder: Path, config: Any, processor: Sequence[Any]) -> None:
    """What 4.45+ processors need to expand ``<image>`` (``patch_size`` ...), saved also by releases whose
    processor does not take it (4.37: the model expands it there), so that the export generates on every release."""
    path = folder / "processor_config.json"
    saved = _read_json(path) if path.is_file() else {}
    if "patch_size" in saved:
        return
    tokenizer = next((p.tokenizer for p in processor if hasattr(p, "tokenizer")), None)
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_index) if tokenizer is not None else "<image>"
    saved.setdefault("processor_class", type(processor[0]).__name__)
    saved.update(patch_size=config.vision_config.patch_size, num_additional_image_tokens=1, image_token=image_token,
                 vision_feature_select_strategy=config.vision_feature_select_strategy)
    _write_json(path, saved)


def save_export(model: nn.Module, processor: Sequence[Any], target: Path, cfg: Any) -> Path:
    """Write ``model`` (LoRA merged, in ``export.dtype``) and its processor parts to ``target`` atomically."""
    hf = _merged(model).to(DTYPES[cfg.export.dtype])
    hf.config.text_config.use_cache = True  # training turned it off

    with atomic_directory(target, overwrite=True) as folder:  # check_export_target allowed replacing it
        save_portable(hf, processor, folder)
        mark(folder, cfg)
    return hf


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
        hf = save_export(model, processor, target, cfg)
        if cfg.export.original_llava and kind == "llava":
            from .mllm_original import save_original_llava

            save_original_llava(hf, processor[0].tokenizer, original_dir(cfg), lambda folder: mark(folder, cfg))
    barrier(env)
    return target
