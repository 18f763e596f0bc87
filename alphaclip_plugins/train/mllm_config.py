"""Configuration of ``alphaclip train-mllm``: fine-tuning a region-aware LLaVA or BLIP-2 from a YAML recipe.

The sections mirror the region trainer's (``train/config.py``): ``model`` says which HF directory to start
from and which parts train, ``data`` where the region conversations are, ``optim`` the AdamW settings,
``distributed`` and ``export`` as there; the run-level fields (steps, batch size, precision, resume, ...) are
the same. Recipes in ``configs/mllm/`` set these; ``key=value`` arguments override any field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from .config import DistributedConfig, RunConfig
from .mllm_synthetic import ConversationConfig


@dataclass
class MLLMModelConfig:
    path: Optional[str] = None  # HF directory: an Alpha LLaVA, a stock LLaVA (+ alpha_checkpoint) or an Alpha BLIP-2
    alpha_checkpoint: Optional[str] = None  # Alpha-CLIP vision weights put into the tower (any layout the core reads)
    tokenizer: Optional[str] = None  # tokenizer / processor directory (default: `path`)
    template: Literal["auto", "chat", "llava_v1"] = "auto"  # LLaVA prompts: the chat template if any, else llava_v1
    system: Optional[str] = None  # system prompt (null: LLaVA-1.5's for llava_v1, none for a chat template)
    prompt: str = "a photo of"  # BLIP-2: text before the answer when a sample's question is just "<image>"
    max_length: Optional[int] = None  # truncate longer prompts (a sample losing its image or answer is skipped)
    geometry: Literal["pad", "crop", "squash"] = "pad"  # how image and region reach the tower's square
    train_projector: bool = True  # LLaVA: multi_modal_projector; BLIP-2: Q-Former, query tokens, language projection
    train_lm: Literal["none", "full", "lora"] = "none"  # the language model: frozen, all weights, or LoRA (peft)
    train_tower: Literal["none", "alpha", "full"] = "none"  # the vision tower: frozen, the alpha conv, or all of it
    lora_rank: int = 8  # LoRA rank (train_lm=lora)
    lora_alpha: float = 16.0  # LoRA scaling numerator
    lora_dropout: float = 0.0  # LoRA dropout
    lora_targets: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # LM linears
    grad_checkpointing: bool = False  # recompute LM and tower layers in backward: less memory, more time
    build: Optional[Literal["tiny_shapes_llava"]] = None  # write `path` from parts first if it is missing (tiny_llava.py)


@dataclass
class MLLMDataConfig:
    train: Optional[str] = None  # region conversations: JSONL or a JSON list (train/mllm_data.py's format)
    image_root: Optional[str] = None  # images folder for relative paths (default: the file's folder)
    num_workers: int = 2  # DataLoader worker processes (0 = load in the training process)
    max_bad_fraction: float = 0.01  # stop when more than this fraction of samples cannot be used
    synthetic: Optional[ConversationConfig] = None  # write synthetic region conversations to `train` first if missing


@dataclass
class MLLMOptimConfig:
    lr: float = 2e-5  # learning rate of the projector (LLaVA) / Q-Former (BLIP-2)
    lm_lr_ratio: float = 1.0  # the language model (or its LoRA adapters) trains at lr * lm_lr_ratio
    tower_lr_ratio: float = 0.1  # the vision tower (or its alpha conv) trains at lr * tower_lr_ratio
    weight_decay: float = 0.0  # AdamW decay, on weights of >= 2 dims only
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 30  # linear warmup from 0, then cosine decay
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    grad_clip: Optional[float] = 1.0  # max global gradient norm (null: no clipping)


@dataclass
class MLLMExportConfig:
    dir: Optional[str] = None  # where the final model goes (default: <output_dir>/final); never replaced silently
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # storage dtype of the exported weights
    original_llava: bool = False  # LLaVA: also write <dir>-llava, which the LLaVA code base's load_pretrained_model reads


@dataclass
class MLLMTrainConfig(RunConfig):
    model: MLLMModelConfig = field(default_factory=MLLMModelConfig)
    data: MLLMDataConfig = field(default_factory=MLLMDataConfig)
    optim: MLLMOptimConfig = field(default_factory=MLLMOptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    export: MLLMExportConfig = field(default_factory=MLLMExportConfig)
    output_dir: str = "runs/mllm"  # checkpoints, logs and the final model
    steps: int = 1000  # optimizer steps
    batch_size: int = 128  # global batch per optimizer step (all processes, all accumulation steps)
    save_every: int = 500  # steps between checkpoints (0: only at the end)

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.model
        if isinstance(m, MLLMModelConfig):
            if m.path is None:
                raise ValueError("model.path is not set; point it at an HF LLaVA or Alpha BLIP-2 directory")
            if not (m.train_projector or m.train_lm != "none" or m.train_tower != "none"):
                raise ValueError("nothing would train: set model.train_projector, model.train_lm or model.train_tower")
            if m.train_lm == "lora" and m.lora_rank < 1:
                raise ValueError(f"model.train_lm=lora needs model.lora_rank >= 1; got {m.lora_rank}")
