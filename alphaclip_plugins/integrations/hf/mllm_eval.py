"""Evaluate a region-aware LLaVA on region conversations: the scores with the region, and with whole-image alpha.

Each sample of a conversation file (``train/mllm_data.py``) is asked its last question (earlier turns are
kept as context); the greedy answer is scored against the sample's last answer with
:func:`~alphaclip_plugins.train.caption_metrics.caption_scores` (BLEU-4, ROUGE-L, CIDEr, METEOR and SPICE
where Java can run them, exact match). The same samples are then asked with whole-image alpha (the region
dropped): the difference is what the region adds. ``alphaclip eval-mllm`` prints both as a table or JSON.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence

from ...core.io import PathLike
from .ask import collator_for, generate, load_llava

COLUMNS = ("BLEU-4", "ROUGE-L", "CIDEr", "METEOR", "SPICE", "exact")


def predict(model: Any, processor: Any, samples: Sequence[Any], batch_size: int = 64,
            max_new_tokens: int = 16) -> List[str]:
    """Greedy answers to each sample's last question, ``batch_size`` samples per batch."""
    collator = collator_for(processor)
    out: List[str] = []
    for i in range(0, len(samples), batch_size):
        out += generate(model, collator, samples[i: i + batch_size], max_new_tokens)
    return out


def evaluate_regions(model: Any, processor: Any, data: PathLike, image_root: Optional[str] = None,
                     limit: Optional[int] = None, batch_size: int = 64, max_new_tokens: int = 16,
                     java: Optional[bool] = None) -> Dict[str, Any]:
    """Score a model on a conversation file, with each sample's region and with the whole image.

    Returns:
        ``{"samples": N, "skipped": [(name, reason), ...], "region": scores, "whole_image": scores,
        "messages": [...], "examples": [{"name", "reference", "region", "whole_image"}, ...]}`` with scores as
        :func:`caption_scores` gives them.

    Raises:
        ValueError: no sample of the file could be read.
    """
    from ...train.caption_metrics import caption_scores
    from ...train.mllm_data import BadSample, ConversationDataset

    dataset = ConversationDataset.from_file(data, image_root)
    items = [dataset[i] for i in range(len(dataset) if limit is None else min(limit, len(dataset)))]
    skipped = [(s.name, s.reason) for s in items if isinstance(s, BadSample)]
    samples = [s for s in items if not isinstance(s, BadSample)]
    if not samples:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise ValueError(f"no usable sample in {data}{first}; check the file with "
                         f"python -m alphaclip_plugins.train.mllm_convert check")
    references = [[s.turns[-1][1]] for s in samples]
    report: Dict[str, Any] = {"samples": len(samples), "skipped": skipped, "messages": []}
    answers = {}
    for key, batch in (("region", samples), ("whole_image", [replace(s, region=None) for s in samples])):
        answers[key] = predict(model, processor, batch, batch_size, max_new_tokens)
        report[key], messages = caption_scores(answers[key], references, java)
        report["messages"] = report["messages"] or messages
    report["examples"] = [{"name": s.name, "reference": r[0], "region": a, "whole_image": w}
                          for s, r, a, w in zip(samples, references, answers["region"], answers["whole_image"])]
    return report


def evaluate_dir(model_dir: Optional[PathLike], data: PathLike, **kwargs: Any) -> Dict[str, Any]:
    """:func:`evaluate_regions` for a model directory (None = the embedded tiny model)."""
    model, processor = load_llava(model_dir)
    return evaluate_regions(model, processor, data, **kwargs)


def format_table(report: Dict[str, Any]) -> str:
    """The scores side by side: one row per score, columns region / whole image / difference."""
    lines = [f"{'score':<8} {'region':>8} {'whole':>8} {'gain':>8}"]
    for name in COLUMNS:
        a, b = report["region"].get(name), report["whole_image"].get(name)
        if a is None or b is None:
            lines.append(f"{name:<8} {'-':>8} {'-':>8} {'-':>8}")
        else:
            lines.append(f"{name:<8} {a:>8.4f} {b:>8.4f} {a - b:>+8.4f}")
    lines.append(f"{report['samples']} samples" + (f", {len(report['skipped'])} skipped" if report["skipped"] else ""))
    lines += report["messages"]
    return "\n".join(lines)
