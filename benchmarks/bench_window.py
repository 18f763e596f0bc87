"""Windowed against global attention in the vision tower at detection resolution (ViTDet's trade).

Time and peak memory per image of the dense feature forward (``forward_intermediates`` of the last block,
as the detection backbones call it): ViT-B/16, 1024 px, batch 1, fp32, CPU by default. Windowed is ViTDet's
setting: 14 x 14 windows (the 64 x 64 grid is padded to 70 x 70) and global attention in blocks 2, 5, 8, 11.
Each variant runs in its own process; peak memory is the rise of the process's peak resident set over its
resident set before the forward (Linux ``/proc``).

    python benchmarks/bench_window.py [--size 1024] [--iters 1] [--threads 1] [--train]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

VARIANTS = {"global": dict(window_size=0), "windowed": dict(window_size=14, global_blocks=(2, 5, 8, 11))}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(variant: str, size: int, iters: int, train: bool) -> dict:
    """One variant in this process: seconds per image and peak MiB of one forward (and backward)."""
    from alphaclip_plugins.core.vision import feature_tower

    torch.manual_seed(0)
    tower = feature_tower("ViT-B/16", **VARIANTS[variant]).train(train)
    x = torch.randn(1, 4, size, size)
    with torch.set_grad_enabled(train):  # warm up the allocator and thread pools on a small image
        tower.forward_intermediates(x[..., :224, :224], indices=[-1], intermediates_only=True)
    times = []
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = _rss_kb("VmRSS")
    for _ in range(iters):
        t0 = time.perf_counter()
        with torch.set_grad_enabled(train):
            (feat,) = tower.forward_intermediates(x, indices=[-1], intermediates_only=True)
            if train:
                feat.float().square().mean().backward()
        times.append(time.perf_counter() - t0)
        del feat
    return dict(seconds=min(times), peak_mib=(_rss_kb("VmHWM") - before) / 1024)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train", action="store_true", help="forward + backward instead of inference")
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # the child process
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.variant:
        print(json.dumps(measure(a.variant, a.size, a.iters, a.train)))
        return
    rows = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--size", str(a.size), "--iters", str(a.iters),
               "--threads", str(a.threads)] + (["--train"] if a.train else [])
        rows[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    g = rows["global"]
    mode = "forward + backward" if a.train else "inference forward"
    print(f"ViT-B/16, {a.size} px, batch 1, fp32, CPU, {a.threads} thread(s), {mode}")
    print(f"| attention | s / image | peak MiB / image | time ratio | memory ratio |")
    print(f"|---|---|---|---|---|")
    for variant, r in rows.items():
        print(f"| {variant} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | {r['seconds'] / g['seconds']:.2f} "
              f"| {r['peak_mib'] / g['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()
