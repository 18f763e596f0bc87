"""Region-to-text retrieval: does the model find each region's caption, with the region and without it?

For every held-out sample the distinct captions of the set are ranked by cosine similarity to the
region embedding; top-1 is right when the best caption is the sample's own. The same samples are
ranked again with whole-image alpha: on data where each image holds several described regions, the
gap between the two numbers is what the alpha channel contributes.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..core.factory import tokenize
from ..core.processor import RegionProcessor
from .data import Record, SampleDecoder, SampleError
from .shards import member_opener

ImageFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]  # pixels, alpha -> [B, D] normalised
TextFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [K, L] -> [K, D] normalised


def decode_all(
    records: Sequence[Record], processor: RegionProcessor, files: Optional[Sequence[dict]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, List[str], int]:
    """Decode samples as given (regions kept, no whole-image substitution); unreadable ones are skipped.

    Returns:
        ``pixel_values [N, 3, S, S]``, ``alpha [N, 1, S, S]``, N captions, and the number skipped.
    """
    pixels, alphas, captions, skipped = [], [], [], 0
    for i, rec in enumerate(records):
        decoder = SampleDecoder(processor, member_opener(files[i])) if files is not None else SampleDecoder(processor)
        try:
            p, a, c = decoder(rec, whole=False)
        except SampleError:
            skipped += 1
            continue
        pixels.append(p)
        alphas.append(a)
        captions.append(c)
    if not pixels:
        raise ValueError(f"none of the {len(records)} evaluation samples could be read")
    return torch.stack(pixels), torch.stack(alphas), captions, skipped


@torch.no_grad()
def retrieval_top1(
    image_fn: ImageFn, text_fn: TextFn, pixel_values: torch.Tensor, alpha: torch.Tensor, captions: Sequence[str],
    device: torch.device, batch_size: int = 256,
) -> Dict[str, float]:
    """Region-to-text top-1 with the region alpha and with whole-image alpha, on the same samples.

    Args:
        image_fn: ``(pixels [B, 3, S, S], alpha [B, 1, S, S] or None) -> [B, D]`` normalised features.
        text_fn: ``tokens [K, L] -> [K, D]`` normalised features.
        pixel_values, alpha: ``[N, 3, S, S]`` and ``[N, 1, S, S]``.
        captions: N captions; the distinct ones are the candidates.

    Returns:
        ``region_top1``, ``whole_image_top1``, ``chance`` (1 / number of candidates) and ``samples``.
    """
    candidates = sorted(set(captions))
    target = torch.tensor([candidates.index(c) for c in captions])
    text = torch.cat([text_fn(tokenize(candidates[i : i + batch_size]).to(device)).float()
                      for i in range(0, len(candidates), batch_size)])
    hits = {"region": 0, "whole": 0}
    for i in range(0, len(captions), batch_size):
        px = pixel_values[i : i + batch_size].to(device)
        for kind, a in (("region", alpha[i : i + batch_size].to(device)), ("whole", None)):
            pred = (image_fn(px, a).float() @ text.T).argmax(dim=-1).cpu()
            hits[kind] += int((pred == target[i : i + batch_size]).sum())
    n = len(captions)
    return {"region_top1": hits["region"] / n, "whole_image_top1": hits["whole"] / n,
            "chance": 1.0 / len(candidates), "samples": float(n)}
