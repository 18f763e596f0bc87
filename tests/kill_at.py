"""Run the trainer in this process and SIGKILL it at one point, as a crash would (for the resume tests).

    python tests/kill_at.py POINT:N CONFIG [key=value ...]

Points: ``step:N`` once optimizer step N is done (the loop is about to set the next step's lr);
``save:N`` inside the N-th checkpoint write, after its first file; ``saved:N`` once the N-th checkpoint
is in place, before older ones are pruned. The trainer itself has no such hook: this wraps its functions.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from alphaclip_plugins.train import checkpointing, trainer
from alphaclip_plugins.train.cli import main


def kill_on_call(owner: object, name: str, call: int) -> None:
    """Replace ``owner.name`` by a wrapper that SIGKILLs the process on its ``call``-th call."""
    original: Callable = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    point, n = sys.argv[1].split(":")
    n = int(n)
    if point == "step":  # the lr of step n + 1 (counted from this process's first step) is never set
        kill_on_call(trainer, "set_lr", n + 1)
    elif point == "save":  # each write saves the model, then the optimizer: die before the optimizer of write n
        kill_on_call(checkpointing, "save_safetensors", 2 * n)
    elif point == "saved":
        kill_on_call(checkpointing.Checkpointer, "prune", n)
    else:
        sys.exit(f"unknown kill point {point!r}; use step:N, save:N or saved:N")
    sys.exit(main(sys.argv[2:]))
