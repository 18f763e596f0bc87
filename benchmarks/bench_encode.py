"""Image-encoding throughput of Alpha-CLIP against open_clip, timm and transformers on the same weights.

Prints one table measured side by side in one run: ViT-B/16, fp32, 224 px, batch 8 (configurable), on
whatever device is given; plus the machine's fp32 GEMM rate as the roofline, the alpha overhead, and
multi-region classification (16 regions of one image) against 16 whole images.

    python benchmarks/bench_encode.py [--batch 8] [--iters 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

from alphaclip_plugins import create_model
from alphaclip_plugins.core.alpha import encode_alpha
from alphaclip_plugins.core.convert import from_alphaclip


def build_references(model) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """open_clip, timm and transformers ViT-B/16 carrying ``model``'s weights."""
    import open_clip
    import timm
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    sd = model.state_dict()
    plain = {k: v for k, v in sd.items() if "conv1_alpha" not in k}
    oc = open_clip.create_model("ViT-B-16-quickgelu")
    oc.load_state_dict(plain)
    tm = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=512)
    tm.load_state_dict(from_alphaclip(plain, "timm"))
    cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16, projection_dim=512, hidden_act="quick_gelu")
    hf = CLIPVisionModelWithProjection._from_config(cfg, attn_implementation="sdpa")
    hf.load_state_dict({k: v for k, v in from_alphaclip(plain, "hf").items()
                        if k.startswith(("vision_model.", "visual_projection."))})
    for m in (oc, tm, hf):
        m.eval()
    return {
        "open_clip": oc.encode_image,
        "timm": tm,
        "transformers (sdpa)": lambda x: hf(pixel_values=x).image_embeds,
    }


def gemm_gflops(device: str, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fns: Dict[str, Callable[[], torch.Tensor]], iters: int, device: str) -> Dict[str, List[float]]:
    """Round-robin timing so that every candidate sees the same machine state."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(iters):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return times


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--regions", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dev, B, R = args.device, args.batch, args.regions

    model = create_model("ViT-B/16").to(dev)
    with torch.no_grad():
        model.visual.conv1_alpha.weight.normal_(std=0.02)
    refs = build_references(model)
    for m in refs.values():
        if isinstance(m, torch.nn.Module):
            m.to(dev)
    torch.manual_seed(0)
    image = torch.randn(B, 3, 224, 224, device=dev)
    mask = torch.zeros(B, 1, 224, 224, device=dev)
    mask[..., 40:180, 60:200] = 1
    alpha = encode_alpha(mask)
    one, many = torch.randn(1, 3, 224, 224, device=dev), torch.randn(R, 3, 224, 224, device=dev)
    region_alpha = encode_alpha((torch.rand(R, 1, 224, 224, device=dev) > 0.5).float())

    fns = {
        "alphaclip (alpha)": lambda: model.encode_image(image, alpha),
        "alphaclip (no alpha)": lambda: model.encode_image(image),
        **{name: (lambda f=f: f(image)) for name, f in refs.items()},
        f"alphaclip {R} regions of 1 image": lambda: model.encode_image(one, region_alpha),
        f"alphaclip {R} whole images": lambda: model.encode_image(many),
    }
    times = measure(fns, args.iters, dev)
    batch = {k: R if k.startswith(f"alphaclip {R} ") else B for k in fns}
    rate = {k: batch[k] / statistics.median(v) for k, v in times.items()}
    others = max(rate[k] for k in refs)
    flops = 2 * sum(p.numel() for n, p in model.visual.named_parameters() if p.ndim == 2 and "transformer" in n) * 197
    gemm = gemm_gflops(dev)

    print(f"ViT-B/16 image encoding, fp32, {dev}, batch {B}, {torch.get_num_threads()} threads, median of {args.iters}")
    print(f"{'model':<34}{'images/s':>10}{'x fastest other':>17}{'GFLOP/s':>10}{'x GEMM':>8}")
    for k in list(refs) + ["alphaclip (alpha)", "alphaclip (no alpha)"]:
        print(f"{k:<34}{rate[k]:>10.2f}{rate[k] / others:>17.3f}{rate[k] * flops / 1e9:>10.1f}"
              f"{rate[k] * flops / 1e9 / gemm:>8.2f}")
    print(f"{'fp32 GEMM roofline (2048^3)':<34}{'':>10}{'':>17}{gemm:>10.1f}{1.0:>8.2f}")
    print(f"alpha overhead: {rate['alphaclip (no alpha)'] / rate['alphaclip (alpha)'] - 1:+.2%} "
          f"(time with alpha / without - 1)")
    multi, single = rate[f"alphaclip {R} regions of 1 image"], rate[f"alphaclip {R} whole images"]
    print(f"{R} regions of one image: {multi:.2f} regions/s vs {single:.2f} images/s "
          f"for {R} whole images = {multi / single:.3f}x")


if __name__ == "__main__":
    main()
