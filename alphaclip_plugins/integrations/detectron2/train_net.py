"""detectron2's ``tools/train_net.py`` command line with :class:`AlphaCLIPTrainer` and the package's config keys::

    python -m alphaclip_plugins.integrations.detectron2.train_net --config-file configs/detectron2/X.yaml \\
        [--num-gpus N] [--eval-only] [--resume] [KEY VALUE ...]
"""
from __future__ import annotations

from detectron2.engine import default_argument_parser, default_setup, launch

from .meta_arch import AlphaCLIPCheckpointer
from .trainer import AlphaCLIPTrainer, get_cfg


def setup(args):
    """The frozen config of ``--config-file`` and the trailing ``KEY VALUE`` overrides."""
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = AlphaCLIPTrainer.build_model(cfg)
        AlphaCLIPCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return AlphaCLIPTrainer.test(cfg, model)
    trainer = AlphaCLIPTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()
