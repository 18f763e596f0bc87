"""The ``alphaclip`` command: classify regions, convert checkpoints, inspect files, write vocabularies, train;
ask a region-aware LLaVA about regions and score one (``ask``, ``eval-mllm``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, NoReturn, Optional, Sequence

from .core.convert import FORMATS
from .core.zeroshot import TEMPLATES

_PROG = "alphaclip"


class Failure(SystemExit):
    """Exit with ``code`` after ``alphaclip: error: <message>`` was printed; ``str()`` gives the message."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str, code: int = 1) -> "NoReturn":
    """Print one line ``alphaclip: error: ...`` on stderr and exit (2 for usage errors)."""
    first = " ".join(str(message).split())  # one line, whatever the exception's text held
    print(f"{_PROG}: error: {first}", file=sys.stderr)
    raise Failure(first, code)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr, exit status 2."""

    def error(self, message: str) -> "NoReturn":
        fail(f"{message} (see {self.prog} --help)", 2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number; got {text!r}")
    return value


def _box(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"a box is x0,y0,x1,y1 in pixels; got {text!r}")
    return values


def _load_model(args: argparse.Namespace):
    from .core.factory import create_model

    if args.pretrained or args.alpha_checkpoint:
        return create_model(args.model, pretrained=args.pretrained, alpha_checkpoint=args.alpha_checkpoint,
                            strict=not args.non_strict), None
    from .core.factory import model_labels, resolve_model

    return resolve_model("default"), model_labels()


def cmd_classify(args: argparse.Namespace) -> None:
    from .core.images import open_image, open_mask
    from .core.processor import RegionProcessor
    from .core.zeroshot import classify_regions

    image = open_image(args.image)  # bad inputs fail before the model loads
    regions: list = [open_mask(m) for m in args.mask] + list(args.box)
    names = [f"mask {m}" for m in args.mask] + [f"box {','.join(f'{v:g}' for v in b)}" for b in args.box]
    model, default_labels = _load_model(args)
    labels = args.labels or default_labels
    if not labels:
        fail("pass --labels (class names to choose from)", 2)
    if not regions:
        regions, names = [None], ["whole image"]
    processor = RegionProcessor(model.visual.cfg.image_size, args.mode)
    probs = classify_regions(model, image, regions, labels, args.templates, processor)
    top = probs.topk(min(args.top, len(labels)), dim=-1)
    results = [
        {"region": name, "labels": [labels[i] for i in idx.tolist()], "probs": [round(p, 6) for p in val.tolist()]}
        for name, val, idx in zip(names, top.values, top.indices)
    ]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    width = max(len(r["region"]) for r in results)
    for r in results:
        ranked = "  ".join(f"{label} {p:.3f}" for label, p in zip(r["labels"], r["probs"]))
        print(f"{r['region']:<{width}}  {ranked}")


def cmd_convert(args: argparse.Namespace) -> None:
    from .core.checkpoint import load_checkpoint, save_weights
    from .core.factory import create_model, save_pretrained
    from .core.weights import match_architecture, read_weights

    dst = Path(args.dst)
    if dst.exists() or dst.is_symlink():
        if not args.force:
            fail(f"{dst} already exists; pass --force to replace it", 2)
        if dst.is_dir() != (args.to in ("alphaclip", "hf")):
            fail(f"{dst} is a {'directory' if dst.is_dir() else 'file'}, but --to {args.to} writes a "
                 f"{'directory' if args.to in ('alphaclip', 'hf') else 'file'}; choose another destination", 2)
    if args.clip:  # an Alpha-CLIP vision tower plus the text tower of its CLIP
        sd = create_model(args.model, pretrained=args.clip, alpha_checkpoint=args.src).state_dict()
    else:
        sd = read_weights(args.src).state_dict
    if args.to == "alphaclip":
        from .core.weights import describe

        name = args.model or match_architecture(describe(sd))
        if name is None or "token_embedding.weight" not in sd:
            fail("the alphaclip format holds both towers; pass --clip CLIP_CHECKPOINT for the text "
                 "tower (and --model ARCH if it is not a known architecture)", 2)
        model = create_model(name)
        load_checkpoint(model, sd)
        save_pretrained(model, dst, overwrite=args.force)
    elif args.to == "hf":
        from .integrations.hf import export_hf

        export_hf(sd, dst, overwrite=args.force)
    else:
        save_weights(sd, dst, args.to)
    print(f"wrote {dst} ({args.to} layout)")


def read_class_names(path: str) -> List[str]:
    """Class names from a text file: one per line; blank lines and lines starting with ``#`` are skipped."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        fail(f"{path} holds no class names; write one name per line", 2)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        fail(f"{path} names {', '.join(map(repr, repeated))} more than once; each class must appear once", 2)
    return names


def cmd_vocab(args: argparse.Namespace) -> None:
    from .core.factory import resolve_model
    from .core.zeroshot import save_text_embeddings

    out = Path(args.output)
    if (out.exists() or out.is_symlink()) and not args.force:
        fail(f"{out} already exists; pass --force to replace it", 2)
    if out.is_dir():
        fail(f"{out} is a directory; give a file name such as vocab.safetensors", 2)
    names = read_class_names(args.classes)  # a bad class list fails before the model loads
    model = resolve_model(args.model).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    emb = save_text_embeddings(model, names, out, args.templates)
    print(f"wrote {out} ({len(names)} classes, {emb.shape[1]}-d embeddings, {args.templates} templates)")


def cmd_info(args: argparse.Namespace) -> None:
    from .core.weights import match_architecture, read_weights

    weights = read_weights(args.checkpoint)
    sd, facts = weights.state_dict, weights.facts()
    alpha = sd.get("visual.conv1_alpha.weight")
    info = {
        "path": str(args.checkpoint), "layout": weights.format,
        "architecture": match_architecture(facts) or "unknown",
        "towers": [t for t, k in (("vision", "visual.conv1.weight"), ("text", "token_embedding.weight")) if k in sd],
        "alpha": "absent (plain CLIP)" if weights.new_alpha or alpha is None
        else ("zero (CLIP behaviour)" if not alpha.any() else "trained"),
        "parameters": sum(v.numel() for k, v in sd.items() if not (weights.new_alpha and k.endswith("conv1_alpha.weight"))),
        "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in sd.values()}),
        **facts,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:<16} {v}")


def _quiet_transformers() -> None:
    """No weight-loading progress bars around a command's one line of output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def cmd_ask(args: argparse.Namespace) -> None:
    from .core.images import open_image, open_mask

    image = open_image(args.image)  # bad inputs fail before the model loads
    if not args.question.strip():
        fail('the question is empty; ask something, e.g. "What is in the highlighted region?"', 2)
    regions: list = [open_mask(m) for m in args.mask] + list(args.box)
    names = [f"mask {m}" for m in args.mask] + [f"box {','.join(f'{v:g}' for v in b)}" for b in args.box]
    if not regions:
        regions, names = [None], ["whole image"]
    from .integrations.hf.ask import ask, load_llava, region_masks

    region_masks(image, regions)  # a region that does not fit the image fails before the model loads
    _quiet_transformers()
    model, processor = load_llava(args.model)
    answers = ask(model, processor, image, regions, args.question, args.max_new_tokens)
    if args.json:
        print(json.dumps([{"region": n, "answer": a} for n, a in zip(names, answers)], indent=2))
    elif len(answers) == 1:
        print(answers[0])
    else:
        width = max(len(n) for n in names)
        for n, a in zip(names, answers):
            print(f"{n:<{width}}  {a}")


def cmd_eval_mllm(args: argparse.Namespace) -> None:
    from .integrations.hf.mllm_eval import evaluate_dir, format_table

    if not Path(args.data).is_file():
        fail(f"{args.data} is not a file; pass a conversation file (.jsonl or .json, see docs/mllm.md)", 2)
    _quiet_transformers()
    report = evaluate_dir(args.model, args.data, image_root=args.image_root, limit=args.limit,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          java=False if args.no_java else None)
    if not args.examples:
        report.pop("examples")
    print(json.dumps(report, indent=2) if args.json else format_table(report))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_PROG, description="Alpha-CLIP, the region-aware CLIP")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="zero-shot classify regions of an image")
    p.add_argument("image")
    p.add_argument("--mask", action="append", default=[], help="a mask image: 255 (or 1) = region, 0 = background, values between are soft; repeatable")
    p.add_argument("--box", action="append", default=[], type=_box, help="x0,y0,x1,y1 in pixels; repeatable")
    p.add_argument("--labels", nargs="+", help="class names (default: the embedded model's vocabulary)")
    p.add_argument("--model", default=None, help="architecture, e.g. ViT-B/16 (inferred from the file if omitted)")
    p.add_argument("--pretrained", help="CLIP checkpoint (OpenAI .pt, open_clip, HF, timm, or a saved directory)")
    p.add_argument("--alpha-checkpoint", help="Alpha-CLIP vision tower (e.g. clip_b16_grit1m_fultune_8xe.pth)")
    p.add_argument("--non-strict", action="store_true", help="load what fits from partial checkpoints")
    p.add_argument("--templates", default="ovseg", choices=sorted(TEMPLATES),
                   help="prompt set: ovseg (14 prompts) or clip (1 prompt)")
    p.add_argument("--mode", default="pad", choices=["pad", "crop", "squash"], help="geometry of image and mask")
    p.add_argument("--top", type=_positive_int, default=3, help="labels shown per region")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("convert", help="convert a checkpoint between layouts")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--clip", help="CLIP checkpoint whose text tower joins an Alpha-CLIP vision tower")
    p.add_argument("--model", default=None, help="architecture (inferred from the file if omitted)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("vocab", help="write the class text embeddings of a detection vocabulary")
    p.add_argument("classes", help="text file, one class name per line")
    p.add_argument("-o", "--output", required=True, help="safetensors file to write (e.g. vocab.safetensors)")
    p.add_argument("--model", default="default",
                   help="Alpha-CLIP model: a save_pretrained directory or checkpoint (default: the embedded model)")
    p.add_argument("--templates", default="ovseg", choices=sorted(TEMPLATES),
                   help="prompt set: ovseg (14 prompts) or clip (1 prompt)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_vocab)

    p = sub.add_parser("info", help="what a checkpoint file holds")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ask", help="ask a region-aware LLaVA about regions of an image")
    p.add_argument("image")
    p.add_argument("question", help='e.g. "What is in the highlighted region?"')
    p.add_argument("--mask", action="append", default=[], help="a mask image (non-zero = region); repeatable")
    p.add_argument("--box", action="append", default=[], type=_box, help="x0,y0,x1,y1 in pixels; repeatable")
    p.add_argument("--model", default=None, help="LLaVA directory (default: the embedded tiny shapes model)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=16, help="longest answer, in tokens")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("eval-mllm", help="score a region-aware LLaVA on region conversations, with and without regions")
    p.add_argument("--model", default=None, help="LLaVA directory (default: the embedded tiny shapes model)")
    p.add_argument("--data", required=True, help="conversation file (.jsonl or .json, docs/mllm.md)")
    p.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the file's)")
    p.add_argument("--limit", type=_positive_int, default=None, help="score only the first N samples")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--max-new-tokens", type=_positive_int, default=16, help="longest answer, in tokens")
    p.add_argument("--no-java", action="store_true", help="skip METEOR and SPICE even where Java is present")
    p.add_argument("--examples", action="store_true", help="include every answer in the JSON output")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_eval_mllm)

    p = sub.add_parser("train", help="fine-tune Alpha-CLIP: alphaclip train CONFIG.yaml [key=value ...]")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=None)

    p = sub.add_parser("train-mllm", help="fine-tune a region-aware LLaVA / BLIP-2: alphaclip train-mllm CONFIG.yaml")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=None)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from .train.cli import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["train-mllm"]:
        from .train.mllm_cli import main as train_mllm_main

        return train_mllm_main(argv[1:])
    debug = "--debug" in argv  # accepted anywhere on the line
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        args.func(args)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # every failure is one line; --debug shows where it came from
        if debug:
            raise
        fail(_describe(e))


def _describe(e: Exception) -> str:
    """An exception as the user should read it: the message, with the kind where the message alone is unclear."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    text = str(e) or type(e).__name__
    if isinstance(e, (ValueError, FileNotFoundError)):
        return text
    return f"{type(e).__name__}: {text} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
