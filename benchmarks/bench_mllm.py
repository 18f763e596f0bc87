"""``train-mllm`` step benchmark: samples/s and peak memory with and without gradient checkpointing.

Two models, built here with random weights (no download): the tiny LLaVA of the tests (32 px tower, 2-layer
LM) and a ViT-B/16 Alpha tower (224 px, 196 patches) with a small Llama (4 layers, width 512). Both train
with the stage-2 recipe's parts (projector + whole LM, tower frozen), so checkpointing has LM layers to
recompute. For each model the two variants are measured side by side in one run: steps alternate between
them and the median step time is reported, so a shared CPU's load does not favour one side.

Peak memory is that of one forward + backward above the weights: on CUDA ``max_memory_allocated``; on a
CPU the peak of PyTorch's profiler memory timeline over everything that is not a parameter, gradient or
optimizer state (activations, temporaries, autograd buffers, uncategorised). Usage::

    python benchmarks/bench_mllm.py                      # CPU, batch 2, a minute or two
    python benchmarks/bench_mllm.py --device cuda --batch 16 --steps 10
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict

import torch

import alphaclip_plugins.integrations.hf as ahf
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

_STEP_MEMORY = (4, 5, 7, 8)  # export_memory_timeline columns: temporary, activation, autograd detail, other
MODELS = {
    "tiny": (dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8), dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)),
    "B/16 + small LM": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             image_size=224, patch_size=16), dict(hidden_size=512, intermediate_size=1376,
                                                                  num_hidden_layers=4)),
}


def build(name: str, device: torch.device, checkpointing: bool) -> LlavaForConditionalGeneration:
    vision, text = MODELS[name]
    lm = LlamaConfig(vocab_size=1024, num_attention_heads=8 if text["hidden_size"] > 64 else 4, num_key_value_heads=4,
                     max_position_embeddings=512, **text)
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=lm, image_token_index=5,
                         image_seq_length=tokens)
    torch.manual_seed(0)
    model = ahf.alphafy_llava(LlavaForConditionalGeneration(config)).to(device).train()
    from alphaclip_plugins.train.mllm_config import MLLMModelConfig
    from alphaclip_plugins.train.mllm_model import prepare_model

    return prepare_model(model, "llava", MLLMModelConfig(path="-", train_lm="full", grad_checkpointing=checkpointing))


def batch(model, size: int, device: torch.device) -> Dict[str, torch.Tensor]:
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    text = 48
    ids = torch.randint(10, 1000, (size, tokens + text), generator=torch.Generator().manual_seed(0))
    ids[:, 1:tokens + 1] = model.config.image_token_index
    labels = ids.clone()
    labels[:, : tokens + text // 2] = -100  # the answer: the second half of the text
    pixels = torch.randn(size, 4, vision.image_size, vision.image_size)
    return {k: v.to(device) for k, v in dict(input_ids=ids, labels=labels, pixel_values=pixels,
                                             attention_mask=torch.ones_like(ids)).items()}


def step(model, optimizer, inputs) -> None:
    model(**inputs, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak_memory(model, inputs, device: torch.device) -> float:
    """Peak bytes of one forward + backward beyond weights, gradients and optimizer state."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(**inputs, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        model(**inputs, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max(sum(s[i] for i in _STEP_MEMORY) for s in sizes)


def measure(name: str, args, device: torch.device) -> Dict[str, Dict[str, float]]:
    variants = {flag: build(name, device, flag) for flag in (False, True)}
    optimizers = {f: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                  for f, m in variants.items()}
    inputs = batch(variants[False], args.batch, device)
    times: Dict[bool, list] = {False: [], True: []}
    for flag in variants:  # warm-up
        step(variants[flag], optimizers[flag], inputs)
    for _ in range(args.steps):
        for flag, model in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(model, optimizers[flag], inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[flag].append(time.perf_counter() - t)
    return {("on" if flag else "off"): {"samples_per_s": args.batch / statistics.median(times[flag]),
                                        "peak_mb": peak_memory(variants[flag], inputs, device) / 2**20}
            for flag in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"batch {args.batch}, {args.steps} timed steps per variant, device {device}, recipe: projector + LM")
    print(f"{'model':<16} {'ckpt':>4} {'samples/s':>10} {'peak MB':>9} {'speed ratio':>12} {'memory ratio':>13}")
    for name in args.models:
        r = measure(name, args, device)
        for key in ("off", "on"):
            speed, mem = r[key]["samples_per_s"] / r["off"]["samples_per_s"], r[key]["peak_mb"] / r["off"]["peak_mb"]
            print(f"{name:<16} {key:>4} {r[key]['samples_per_s']:>10.2f} {r[key]['peak_mb']:>9.1f} {speed:>12.2f} "
                  f"{mem:>13.2f}")


if __name__ == "__main__":
    main()
