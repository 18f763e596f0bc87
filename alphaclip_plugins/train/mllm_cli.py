"""``alphaclip train-mllm CONFIG.yaml [key=value ...]``: fine-tune a region-aware LLaVA or BLIP-2.

Recipes live in ``configs/mllm/``; overrides use dotted keys and YAML values::

    alphaclip train-mllm configs/mllm/llava_stage1.yaml model.path=my-alpha-llava data.train=regions.jsonl

Several processes: ``torchrun --nproc_per_node 8 -m alphaclip_plugins.train.mllm_cli CONFIG.yaml [key=value ...]``.
"""
from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

from .cli import run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``alphaclip train-mllm``. ``argv`` excludes the ``train-mllm`` word; returns an exit code."""
    from .mllm_config import MLLMTrainConfig

    def train(cfg: Any, overwrite: bool) -> Any:
        from .mllm_trainer import train_mllm

        return train_mllm(cfg, overwrite=overwrite)

    # a model directory or recipe that cannot be used (no config.json, LoRA targets that match nothing, no peft)
    return run_cli(argv, "alphaclip train-mllm", "a region-aware LLaVA or BLIP-2", MLLMTrainConfig, train,
                   setup_errors=(ValueError, ImportError))


if __name__ == "__main__":
    sys.exit(main())
