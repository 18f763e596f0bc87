"""What a run reports (rank 0 only): a tqdm bar, TensorBoard scalars and ``metrics.jsonl``."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional


class Monitor:
    """Progress bar with loss / lr / throughput, TensorBoard scalars (optional) and a JSONL log.

    Args:
        directory: the run's output folder (``metrics.jsonl`` and ``tensorboard/`` go there).
        total, start: steps of the run and the step it starts from (after a resume).
        active: False on ranks other than 0: every call is a no-op.
    """

    def __init__(self, directory: Path, total: int, start: int, active: bool, progress: bool, tensorboard: bool):
        self.active = active
        self.bar = self.writer = None
        self.metrics: Optional[Path] = None
        self._t, self._samples = time.perf_counter(), 0
        if not active:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.metrics = directory / "metrics.jsonl"
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(directory / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed; scalars go to metrics.jsonl only "
                              "(pip install 'alphaclip-plugins[train]')")

    def step(self, step: int, samples: int, scalars: Dict[str, float], log: bool) -> None:
        """Advance the bar by one optimizer step of ``samples``; write ``scalars`` when ``log``."""
        if not self.active:
            return
        self._samples += samples
        if self.bar is not None:
            self.bar.update(1)
        if not log:
            return
        now = time.perf_counter()
        scalars = {**scalars, "samples_per_s": self._samples / max(now - self._t, 1e-9)}
        self._t, self._samples = now, 0
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}",
                                 sps=f"{scalars['samples_per_s']:.1f}")
        self.write(step, "train", scalars)

    def write(self, step: int, group: str, scalars: Dict[str, Any]) -> None:
        if not self.active:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"{group}/{k}", v, step)
        with open(self.metrics, "a") as f:  # type: ignore[arg-type]
            f.write(json.dumps({"step": step, "group": group, **scalars}) + "\n")

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
