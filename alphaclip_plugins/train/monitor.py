"""What a run reports (rank 0 only): a tqdm bar, TensorBoard scalars, ``metrics.jsonl`` and ``skipped.jsonl``.

Both JSONL files hold one object per line with the ``step`` it belongs to. A resumed run first drops the
rows past the step it resumes from (an interrupted run wrote them after its last checkpoint, and the
resumed run writes them again), so no step is logged twice.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..core.io import atomic_write
from .data import DataError
from .distributed import DistEnv, all_gather_objects


def read_rows(path: Path) -> List[Dict[str, Any]]:
    """The JSON objects of a JSONL log; a line a killed run left half-written is dropped."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def write_rows(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    """Replace a JSONL log atomically."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def keep_rows_until(path: Path, step: int) -> None:
    """Drop the rows of a JSONL log whose ``step`` is past ``step`` (nothing to do when there are none)."""
    rows = read_rows(path)
    kept = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= step]
    if path.is_file() and len(kept) != len(path.read_text(encoding="utf-8").splitlines()):
        write_rows(path, kept)


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
        self.metrics, self.skipped_log = directory / "metrics.jsonl", directory / "skipped.jsonl"
        for log in (self.metrics, self.skipped_log):
            keep_rows_until(log, start)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: events past the resumed step (written after the last checkpoint) are hidden
                self.writer = SummaryWriter(str(directory / "tensorboard"), purge_step=start + 1)
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

    def eval(self, step: int, metrics: Dict[str, float]) -> None:
        """Log evaluation results and print them."""
        self.write(step, "eval", metrics)
        self.message(f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    def skipped(self, items: Sequence[Sequence[Any]]) -> None:
        """Add unreadable samples ``(step, name, reason)`` to ``skipped.jsonl`` (rewritten whole, atomically)."""
        if not self.active or not items:
            return
        rows = [{"step": int(s), "name": str(n), "reason": str(r)} for s, n, r in items]
        write_rows(self.skipped_log, read_rows(self.skipped_log) + rows)  # type: ignore[arg-type]

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


def due(step: int, every: int, total: int) -> bool:
    """Whether a thing done every ``every`` steps (0: only at the end) is due after ``step`` of ``total``."""
    return step == total or (every > 0 and step % every == 0)


def count_skips(health: Any, batch: Dict[str, Any], monitor: Monitor, step: int) -> None:
    """Count a micro-batch's skipped samples in a ``DataHealth``; a run that stops on them lists them (this
    process's) first."""
    try:
        health.update(batch, step)
    except DataError:
        monitor.skipped(health.take_pending())
        raise


def log_skipped(env: DistEnv, monitor: Monitor, health: Any) -> None:
    """Every rank's samples skipped since the last call go to ``skipped.jsonl`` (before each checkpoint)."""
    gathered = [item for items in all_gather_objects(env, health.take_pending()) for item in items]
    monitor.skipped(sorted(gathered, key=lambda item: item[0]))  # in step order, rank order within a step


def finish(env: DistEnv, monitor: Monitor, health: Any, step: int, listing: Path) -> None:
    """End a run's reports: the last skipped samples, one line on every rank's data health, close the logs."""
    log_skipped(env, monitor, health)
    merged = type(health).merged(all_gather_objects(env, health.state_dict()), health.max_bad_fraction)
    monitor.message(f"done: {step} steps; {merged.summary(listing)}")
    monitor.close()
