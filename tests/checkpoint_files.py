"""Checkpoint files in the exact on-disk layouts users hold, written by the tests from a core model.

One place for every writer: official Alpha-CLIP release, OpenAI CLIP (plain pickle or TorchScript
archive), open_clip training checkpoint, Hugging Face directory, timm file; and broken files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from torch import nn

from alphaclip_plugins.core.convert import from_alphaclip


def official_layout(model: nn.Module) -> Dict[str, torch.Tensor]:
    """An official release state dict: the vision tower only, no prefix, ``attn.in_proj.weight`` (nn.Linear)."""
    tower = getattr(model, "visual", model)
    return {k.replace("attn.in_proj_", "attn.in_proj."): v.clone() for k, v in tower.state_dict().items()}


def official_file(model: nn.Module, path: Path) -> Path:
    """``clip_*_grit*.pth`` of a core model or tower: a plain pickled dict of tensors."""
    torch.save(official_layout(model), path)
    return path


def openai_layout(model: nn.Module) -> Dict[str, torch.Tensor]:
    """OpenAI CLIP's state dict of a plain CLIP (both towers, no alpha conv), with its archives' metadata."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if "conv1_alpha" not in k}
    sd.update(input_resolution=torch.tensor(model.visual.cfg.image_size), context_length=torch.tensor(77),
              vocab_size=torch.tensor(49408))
    return sd


def torchscript_archive(sd: Dict[str, torch.Tensor], path: Path) -> Path:
    """Write ``sd`` as a TorchScript archive, as OpenAI released ``ViT-B-16.pt`` (modules named by the keys)."""

    class Holder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        module = root
        for p in parents:
            if not hasattr(module, p):
                module.add_module(p, Holder())
            module = getattr(module, p)
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(leaf, value)
    torch.jit.save(torch.jit.script(root), str(path))
    return path


def openai_file(model: nn.Module, path: Path, torchscript: bool = True) -> Path:
    """``ViT-*.pt``: OpenAI CLIP as a TorchScript archive (as released) or a plain pickle."""
    if torchscript:
        return torchscript_archive(openai_layout(model), path)
    torch.save(openai_layout(model), path)
    return path


def open_clip_file(model: nn.Module, path: Path) -> Path:
    """An open_clip training checkpoint: ``{"epoch", "name", "state_dict": {"module." + key: ...}}``."""
    sd = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": sd}, path)
    return path


def hf_dir(model: nn.Module, path: Path) -> Path:
    """A Hugging Face model directory (``model.safetensors``, CLIPModel key layout incl. the alpha conv)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    sd = from_alphaclip(model.state_dict(), "hf")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"), {"format": "pt"})
    return path


def timm_file(model: nn.Module, path: Path) -> Path:
    """A timm ``vit_*_clip_*`` safetensors file of the vision tower (``head`` = the projection)."""
    from safetensors.torch import save_file

    sd = from_alphaclip({k: v for k, v in model.state_dict().items() if k.startswith("visual.")}, "timm")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def truncated_copy(src: Path, path: Path) -> Path:
    """The first half of ``src``: a download that broke off."""
    data = src.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
