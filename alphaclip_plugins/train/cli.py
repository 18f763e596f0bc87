"""``alphaclip train CONFIG.yaml [key=value ...]``: run a training config with command-line overrides.

Overrides use dotted keys into the config sections and YAML values::

    alphaclip train configs/train/tiny_shapes.yaml steps=200 optim.lr=1e-3 data.num_workers=0

Several processes: ``torchrun --nproc_per_node 8 -m alphaclip_plugins.train CONFIG.yaml [key=value ...]``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional, Sequence, Tuple


def _parser(prog: str = "alphaclip train", what: str = "Alpha-CLIP") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=f"Fine-tune {what} from a YAML config; key=value arguments override its fields "
                    "(dotted keys, e.g. optim.lr=1e-3 data.train=shards/).",
    )
    p.add_argument("config", nargs="?", help="YAML config file (omit to start from the defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in output_dir, removing an earlier run's checkpoints and logs there")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``alphaclip train``. ``argv`` excludes the ``train`` word; returns an exit code."""
    from .config import TrainConfig

    def train(cfg: Any, overwrite: bool) -> Any:
        from .trainer import train as run

        return run(cfg, overwrite=overwrite)

    return run_cli(argv, "alphaclip train", "Alpha-CLIP", TrainConfig, train)


def run_cli(argv: Optional[Sequence[str]], prog: str, what: str, config_class: type,
            train: Callable[[Any, bool], Any], setup_errors: Tuple[type, ...] = ()) -> int:
    """Parse ``CONFIG [key=value ...] [--print-config] [--overwrite]``, then ``train(cfg, overwrite)``.

    Config, run-folder and data errors are one line on stderr (exit 2 for the first two, 1 for data), and so
    are ``setup_errors`` raised by ``train`` (exit 2: e.g. a model directory that cannot be used)."""
    args = _parser(prog, what).parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))  # flags anywhere
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides  # only overrides were given
    from .config import load_config

    try:
        cfg = load_config(config, overrides, config_class)
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: bad config: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from .data import DataError
    from .distributed import LaunchError
    from .rundir import RunDirError

    try:
        target = train(cfg, args.overwrite)
    except RunDirError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"{prog}: data error: {e}", file=sys.stderr)
        return 1
    except (*setup_errors, LaunchError) as e:  # a launcher the run cannot follow, too
        print(f"{prog}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"model written to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
