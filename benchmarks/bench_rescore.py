"""Cost of Alpha-CLIP re-scoring of detections: a per-box loop against the batched re-scorer.

Every region is one pass through the ViT (its alpha changes the patch embedding), so re-scoring costs
regions x forward; what can be saved is the overhead around it and the regions that need no scoring:

* before: one forward per box (the image preprocessed once per image), every detection scored;
* after: :class:`DetectionRescorer` (``detection/rescore.py``): the detector's top ``--topk`` detections
  per image, their regions batched across all images (``--batch`` per forward, RGB patch embedding once
  per image), then fusion, sort, threshold and cut.

Printed per architecture: regions/s and seconds per image at ``--detections`` detections (at most
``--topk`` of them scored after), and the ratios. Random weights (timing only), fp32, CPU unless CUDA.
B/16 is slow on CPU, so it measures a few boxes and two images by default (``--b16-before-boxes``,
``--b16-after-boxes``): both rates are per region, and a per-image cost is detections / rate.

    python benchmarks/bench_rescore.py [--arch tiny ViT-B/16] [--detections 100] [--topk 100] [--threads N]
"""
from __future__ import annotations

import argparse
import time
from typing import List, Tuple

import torch

from alphaclip_plugins import create_model
from alphaclip_plugins.detection.rescore import DetectionRescorer, RegionScorer, clip_boxes


def scenes(count: int, detections: int, seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``count`` textured 480 x 640 images, each with ``detections`` random boxes and scores."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        image = torch.rand(3, 480, 640, generator=g)
        xy = torch.rand(detections, 2, generator=g) * torch.tensor([560.0, 400.0])
        wh = 16 + torch.rand(detections, 2, generator=g) * 64
        out.append((image, torch.cat([xy, xy + wh], 1), torch.rand(detections, generator=g)))
    return out


@torch.no_grad()
def per_box_loop(scorer: RegionScorer, data) -> Tuple[int, float]:
    """(regions, seconds): one forward per detection."""
    model, device = scorer.model, scorer.model.logit_scale.device
    n, start = 0, time.perf_counter()
    for image, boxes, _ in data:
        pixels, size = scorer.processor.pixels(image)
        pixels = pixels.to(device)
        for box in clip_boxes(boxes, *image.shape[-2:]):
            alpha = scorer.processor.alphas([box], size).to(device)
            feats = model.encode_image(pixels, alpha, normalize=True).float()
            (model.logit_scale.exp() * feats @ scorer.weights.T.to(device)).softmax(-1).cpu()
            n += 1
    return n, time.perf_counter() - start


@torch.no_grad()
def batched(rescorer: DetectionRescorer, data) -> Tuple[int, float]:
    """(regions scored, seconds): the re-scorer over the whole batch of images."""
    labels = [torch.zeros(len(s), dtype=torch.long) for _, _, s in data]
    start = time.perf_counter()
    rescorer.rescore([d[0] for d in data], [d[1] for d in data], labels, [d[2] for d in data])
    n = sum(min(len(s), rescorer.topk or len(s)) for _, _, s in data)
    return n, time.perf_counter() - start


def run(arch: str, args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = create_model(arch).eval().to(device)
    scorer = RegionScorer(model, ["cat", "dog", "car", "tree"], templates="clip", batch_size=args.batch)
    rescorer = DetectionRescorer(scorer, topk=args.topk, max_per_img=0)
    b16 = arch != "tiny"
    before_boxes = args.b16_before_boxes if b16 else args.detections
    after_boxes = args.b16_after_boxes if b16 else args.detections
    images = args.b16_images if b16 else args.images
    batched(rescorer, scenes(1, 2, seed=9))  # warm-up: thread pools, allocator
    n0, t0 = per_box_loop(scorer, scenes(1 if b16 else images, before_boxes))
    rescorer.topk = min(args.topk, after_boxes) if args.topk else 0
    n1, t1 = batched(rescorer, scenes(images, after_boxes))
    before_rate, after_rate = n0 / t0, n1 / t1
    scored = min(args.detections, args.topk) if args.topk else args.detections
    before_img, after_img = args.detections / before_rate, scored / after_rate
    print(f"{arch:<9} before: {before_rate:8.1f} regions/s ({n0} boxes), {before_img:8.3f} s/image at "
          f"{args.detections} detections")
    print(f"{'':<9} after:  {after_rate:8.1f} regions/s ({n1} boxes, {images} images), {after_img:8.3f} s/image "
          f"({scored} of {args.detections} scored)")
    print(f"{'':<9} ratio:  x{after_rate / before_rate:.2f} regions/s, x{before_img / after_img:.2f} per image")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["tiny", "ViT-B/16"])
    p.add_argument("--detections", type=int, default=100, help="detections per image")
    p.add_argument("--topk", type=int, default=100, help="re-scored per image after (0 = all)")
    p.add_argument("--batch", type=int, default=64, help="regions per forward after")
    p.add_argument("--images", type=int, default=4, help="images per batch (tiny)")
    p.add_argument("--b16-images", type=int, default=2)
    p.add_argument("--b16-before-boxes", type=int, default=6, help="boxes timed in B/16's per-box loop")
    p.add_argument("--b16-after-boxes", type=int, default=16, help="boxes per image timed in B/16's batched run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, {torch.get_num_threads()} threads")
    for arch in args.arch:
        run(arch, args)


if __name__ == "__main__":
    main()
