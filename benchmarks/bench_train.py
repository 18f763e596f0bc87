"""Training-step benchmark of the paper recipe on a ViT-B/16 Alpha-CLIP with a frozen text tower.

Measures, in one run and side by side:

* throughput (samples/s) with cached text features (this trainer) vs recomputing the frozen text tower
  every step (the paper code: tokenize + ``encode_text`` per batch, no gradient);
* peak activation memory of one forward + backward with and without gradient checkpointing.

Memory is read from PyTorch's profiler memory timeline (``torch.profiler`` with ``profile_memory=True``,
``export_memory_timeline``), which sorts every CPU/GPU allocation of the step into categories. "Activation
memory" is the peak over the step of everything that is not a parameter, gradient, optimizer state or
input: activations saved for backward, temporaries, autograd buffers and uncategorised allocations
(where checkpointing's recomputation lands), so recomputation is not hidden.

Steps alternate between the variants and the median step time is reported, which keeps a shared CPU's
load from favouring one side. Usage::

    python benchmarks/bench_train.py                  # ViT-B/16, batch 8, CPU: a few minutes
    python benchmarks/bench_train.py --device cuda --batch 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from alphaclip_plugins import create_model, tokenize
from alphaclip_plugins.core.alpha import encode_alpha
from alphaclip_plugins.train.config import OptimConfig
from alphaclip_plugins.train.loss import ContrastiveLoss
from alphaclip_plugins.train.modeling import TextFeatureCache
from alphaclip_plugins.train.optim import build_optimizer

# Columns of export_memory_timeline's sizes: [0, PARAMETER, OPTIMIZER_STATE, INPUT, TEMPORARY, ACTIVATION,
# GRADIENT, AUTOGRAD_DETAIL, uncategorised].
_STEP_MEMORY = (4, 5, 7, 8)
_ACTIVATION = 5


def make_batch(batch: int, size: int, step: int, device: torch.device):
    """Random pixels, random box regions (encoded alpha) and ``batch`` distinct captions."""
    g = torch.Generator().manual_seed(step)
    pixels = torch.randn(batch, 3, size, size, generator=g)
    mask = torch.zeros(batch, 1, size, size)
    for i in range(batch):
        y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
        mask[i, :, y : y + size // 2, x : x + size // 2] = 1
    captions = [f"a photo of object number {i}" for i in range(batch)]  # seen in warmup: cached from then on
    return pixels.to(device), encode_alpha(mask).to(device), captions


def train_step(model, optimizer, loss_fn, text_fn: Callable, batch) -> None:
    pixels, alpha, captions = batch
    image = F.normalize(model.visual(pixels, alpha), dim=-1)
    loss = loss_fn(image, text_fn(captions), model.logit_scale.exp())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def text_functions(model, batch: int, device: torch.device) -> Dict[str, Callable]:
    cache = TextFeatureCache(model, chunk=batch)

    @torch.no_grad()
    def recompute(captions: List[str]) -> torch.Tensor:  # what the paper code does every step
        return F.normalize(model.encode_text(tokenize(captions).to(device)), dim=-1)

    return {"cached": cache, "recompute": recompute}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(model, optimizer, loss_fn, fns: Dict[str, Callable], args, device) -> Dict[str, float]:
    """Median seconds per step of each text variant, steps interleaved; returns samples/s (and the text
    tower's share: median seconds of one recomputation, ``text_s``, and of a whole step, ``step_s``)."""
    times: Dict[str, List[float]] = {k: [] for k in [*fns, "text"]}
    for step in range(args.warmup + args.steps):
        batch = make_batch(args.batch, args.image_size, step, device)
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            train_step(model, optimizer, loss_fn, fn, batch)
            sync(device)
            if step >= args.warmup:  # the cache is warm from here on: every caption was seen in warmup
                times[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        fns["recompute"](batch[2])
        sync(device)
        times["text"].append(time.perf_counter() - t)
    out = {k: args.batch / statistics.median(times[k]) for k in fns}
    return {**out, "text_s": statistics.median(times["text"]), "step_s": statistics.median(times["recompute"])}


def step_memory(model, loss_fn, text_fn, batch, device) -> Dict[str, float]:
    """Peak bytes of one forward + backward (see the module docstring), from the profiler's timeline."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    pixels, alpha, captions = batch
    text = text_fn(captions)
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        image = F.normalize(model.visual(pixels, alpha), dim=-1)
        loss_fn(image, text, model.logit_scale.exp()).backward()
    model.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the export is marked deprecated but still exact
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device=str(device) if device.type == "cuda" else "cpu")
        _, sizes = json.loads(path.read_text())
    return {"step": max(sum(s[i] for i in _STEP_MEMORY) for s in sizes),
            "activation_only": max(s[_ACTIVATION] for s in sizes)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B/16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = create_model(args.arch, device=device).train()
    for n, prm in model.named_parameters():  # the paper recipe: only the vision tower trains
        prm.requires_grad_(n.startswith("visual."))
    optimizer = build_optimizer(model, OptimConfig())
    loss_fn = ContrastiveLoss()
    fns = text_functions(model, args.batch, device)

    speed = throughput(model, optimizer, loss_fn, fns, args, device)
    batch = make_batch(args.batch, args.image_size, 0, device)
    memory = {}
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        memory[ckpt] = step_memory(model, loss_fn, fns["cached"], batch, device)
    model.set_grad_checkpointing(False)

    mib = 2**20
    print(f"{args.arch} vision tower trained, text tower frozen; batch {args.batch}, {args.image_size} px, "
          f"{device}, {torch.get_num_threads()} threads, median of {args.steps} interleaved steps")
    print(f"{'':44s}{'baseline':>14s}{'this trainer':>14s}{'ratio':>8s}")
    print(f"{'samples/s (recompute text | cached text)':44s}{speed['recompute']:14.2f}{speed['cached']:14.2f}"
          f"{speed['cached'] / speed['recompute']:7.2f}x")
    for key, label in (("step", "peak activation MiB (no ckpt | grad ckpt)"),
                       ("activation_only", "  of which saved activations MiB")):
        a, b = memory[False][key] / mib, memory[True][key] / mib
        print(f"{label:44s}{a:14.1f}{b:14.1f}{b / a:7.2f}x")
    print(f"the frozen text tower's forward takes {speed['text_s']:.3f} s of a {speed['step_s']:.3f} s step "
          f"({speed['text_s'] / speed['step_s']:.1%}): the most caching can save")


if __name__ == "__main__":
    main()
