"""Training configuration: dataclasses with the paper code's defaults, loadable from YAML.

Every field can be overridden on the command line with a dotted key (``optim.lr=1e-3``,
``data.train=shards/``, ``steps=2000``). The defaults reproduce the Alpha-CLIP recipe: frozen text tower
and logit scale (100), AdamW with lr 1e-4 for ``conv1_alpha`` and 1e-6 for the rest of the vision tower,
800 warmup steps then cosine decay, symmetric InfoNCE with label smoothing 0.1 over the global batch.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Union

from .synthetic import SyntheticConfig


@dataclass
class ModelConfig:
    name: Optional[str] = "ViT-B/16"  # architecture (core ARCHITECTURES), e.g. "ViT-L/14@336"; null: from `pretrained`
    pretrained: Optional[str] = None  # CLIP weights for both towers (OpenAI, open_clip, HF, save_pretrained dir)
    alpha_checkpoint: Optional[str] = None  # Alpha-CLIP vision weights loaded on top (official .pth, ...)
    overrides: Dict[str, Any] = field(default_factory=dict)  # config fields, e.g. {vision_width: 96}
    train_text: bool = False  # train the text tower too (paper: frozen); needed when it starts random
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, more time
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on the vision tower (needs peft), not its weights
    lora_alpha: float = 16.0  # LoRA scaling numerator
    lora_targets: List[str] = field(default_factory=lambda: ["out_proj", "c_fc", "c_proj"])  # modules to adapt


@dataclass
class DataConfig:
    train: Optional[str] = None  # JSONL manifest, COCO-style .json, or tar shards (folder, glob)
    format: Literal["auto", "jsonl", "coco", "tar"] = "auto"  # auto: from the name (.jsonl / .json / .tar, folder)
    image_root: Optional[str] = None  # images folder for JSONL/COCO paths (default: the file's folder)
    coco_region: Literal["segmentation", "bbox"] = "segmentation"  # which COCO annotation becomes the region
    eval: Optional[str] = None  # held-out samples (.jsonl, .json or shards, told by name) for retrieval
    eval_samples: int = 1000  # evaluate on at most this many
    geometry: Literal["pad", "crop", "squash"] = "pad"  # RegionProcessor mode (paper: pad to square)
    whole_image_ratio: float = 0.1  # probability a sample becomes the whole image with its image caption
    num_workers: int = 2  # DataLoader worker processes (0 = load in the training process)
    shuffle_buffer: int = 1000  # tar shards: samples held for shuffling within a stream
    max_bad_fraction: float = 0.01  # stop when more than this fraction of samples cannot be read
    synthetic: Optional[SyntheticConfig] = None  # write synthetic data to `train` first if it is missing
    synthetic_eval: Optional[SyntheticConfig] = None  # the same for `eval`


@dataclass
class OptimConfig:
    lr: float = 1e-4  # learning rate of conv1_alpha (the new alpha patch embedding)
    lr_ratio: float = 0.01  # the rest of the vision tower trains at lr * lr_ratio
    text_lr_ratio: float = 0.01  # the text tower (with model.train_text) and a trainable logit scale
    weight_decay: float = 0.02  # AdamW decay, on weights of >= 2 dims only (not norms, biases, embeddings)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW betas (CLIP's)
    eps: float = 1e-6  # AdamW epsilon (CLIP's)
    warmup_steps: int = 800  # linear warmup from 0, then cosine decay
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    grad_clip: Optional[float] = 1.0  # max global gradient norm (null: no clipping)


@dataclass
class LossConfig:
    label_smoothing: float = 0.1  # of the symmetric InfoNCE targets
    freeze_logit_scale: bool = True  # keep the logit scale fixed at `logit_scale`
    logit_scale: float = 100.0  # its value (exp of the stored log); used when frozen


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp shards the vision tower (ViT-L and up)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPUs, gloo on CPU


@dataclass
class ExportConfig:
    dir: Optional[str] = None  # where the final model goes (default: <output_dir>/final)
    official: bool = False  # also write the vision tower in the official Alpha-CLIP .pth layout
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # storage dtype of the exported weights
    labels: List[str] = field(default_factory=list)  # class names saved with the model (its default vocabulary)


@dataclass
class RunConfig:
    """The run-level fields both trainers share (``alphaclip train`` and ``alphaclip train-mllm``)."""

    output_dir: str = "runs/alphaclip"  # checkpoints, logs and the final model
    steps: int = 10000  # optimizer steps
    batch_size: int = 4096  # global batch per optimizer step (all processes, all accumulation steps)
    accum_steps: int = 1  # micro-batches per optimizer step (the loss sees one micro-batch at a time)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; fp16 adds a gradient scaler
    device: str = "auto"  # auto: this process's GPU under torchrun, else cuda:0, else cpu
    seed: int = 0  # data order, random choices of the data and initialisation
    threads: Optional[int] = None  # torch CPU threads per process (null: torch's default)
    log_every: int = 10  # steps between logged scalars
    save_every: int = 1000  # steps between checkpoints (0: only at the end)
    keep_last: int = 3  # checkpoints kept on disk
    # auto: continue from output_dir's latest checkpoint if its run had this config (else refuse);
    # true: continue it even with changed settings; false: start at step 0; or a checkpoint folder
    resume: Union[bool, str] = "auto"
    tensorboard: bool = True  # write TensorBoard scalars (needs the tensorboard package)
    progress: bool = True  # tqdm progress bar on rank 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "accum_steps"):
            value = getattr(self, key)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{key} must be at least 1; got {value}")

    def micro_batch(self, world_size: int) -> int:
        """Samples per micro-batch per process."""
        per = self.batch_size // (world_size * self.accum_steps)
        if per * world_size * self.accum_steps != self.batch_size or per == 0:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by world size {world_size} x accum_steps "
                f"{self.accum_steps}; pick a batch_size that is a multiple of {world_size * self.accum_steps}"
            )
        return per

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(RunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    text_cache_size: int = 1_000_000  # frozen text tower: features kept per distinct caption (LRU)
    eval_every: int = 500  # steps between retrieval evaluations (0: only at the end)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.model, ModelConfig) and isinstance(self.model.overrides, dict):
            from ..core.config import check_override_keys

            try:
                check_override_keys(self.model.overrides)
            except TypeError as e:
                raise ValueError(f"model.overrides: {e}") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's type (``"1e-4"`` -> 1e-4, dict -> dataclass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for arg in [a for a in args if a is not type(None)]:
            try:
                return _coerce(value, arg, key)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{key}: cannot read {value!r} as {tp}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key} must be one of {list(args)}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value or {}, key)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false; got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{key} must be a number; got {value!r}")
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{key} must be an integer; got {value!r}")
        try:
            return tp(float(value)) if tp is int and isinstance(value, str) and "e" in value.lower() else tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number; got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{key} must be a string; got {value!r}")
        return str(value)
    if origin in (list, List) and isinstance(value, (list, tuple)):
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if origin in (dict, Dict) and isinstance(value, Mapping):
        return dict(value)
    raise ValueError(f"{key}: cannot read {value!r} as {tp}")


def build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking names and converting types."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{prefix or 'the config'} must be a mapping; got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        where = f"in {prefix!r}" if prefix else "at the top level"
        raise ValueError(f"unknown config keys {sorted(unknown)} {where}; known: {sorted(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()})


def _set_dotted(tree: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = (),
                config_class: Optional[type] = None) -> Any:
    """Read a YAML config (optional) and apply ``key=value`` overrides (dotted keys, YAML values).

    Args:
        config_class: the dataclass to build (default :class:`TrainConfig`; ``MLLMTrainConfig`` for MLLMs).

    Raises:
        ValueError: unknown keys, values of the wrong type, or an override without ``=``.
    """
    import yaml

    tree: Dict[str, Any] = {}
    if path is not None:
        tree = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path} must hold a YAML mapping of config sections")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr=1e-3)")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return build(config_class or TrainConfig, tree)


def config_from_dict(d: Mapping[str, Any]) -> TrainConfig:
    return build(TrainConfig, d)
