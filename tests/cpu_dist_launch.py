"""Run a training script under ``torch.distributed.run`` on CPU-only machines (tests).

mmengine's ``pytorch`` launcher calls ``torch.cuda.set_device(local_rank)`` before it initialises the
process group, which fails without a GPU even for the ``gloo`` backend; with no GPU that call is a no-op
here. The script's process group is destroyed once it returns: ``tools/train.py`` leaves it alive, and
gloo's threads then sometimes abort the exiting process ("terminate called without an active exception").
Usage: ``python -m torch.distributed.run ... tests/cpu_dist_launch.py SCRIPT ARGS...``.
"""
import runpy
import sys

import torch

if not torch.cuda.is_available():
    torch.cuda.set_device = lambda device: None

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
