"""What a run says on the console: whole lines in one write (:func:`emit`) and rank 0's progress (a
bar on a terminal, lines otherwise).

In :mod:`dali_ba.training`, for the trainer and its parts; the stages above (:mod:`dali_ba.train`,
:mod:`dali_ba.doctor`) take :func:`emit` from here too, and no stage below needs it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def emit(line: str, stream: TextIO | None = None) -> None:
    """Write a whole line in one call: launchers (mpirun --tag-output) tag each write separately."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


class Progress:
    """Rank 0's view of training: a tqdm bar on a terminal, plain lines (every ``every`` steps) otherwise
    -- SLURM logs and launchers that pipe output get lines, not carriage returns."""

    def __init__(self, total: int, initial: int, every: int, enabled: bool, stream: TextIO | None = None):
        self._stream = stream or sys.stderr
        self._every, self._total, self._enabled = every, total, enabled
        self._bar = None
        self._last = (initial, time.perf_counter())
        if enabled and self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", file=self._stream, dynamic_ncols=True)

    def update(self, step: int, epoch: int, loss: float, lr: float) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}", lr=f"{lr:.4g}", refresh=False)
            return
        if step % self._every and step != self._total:
            return
        last_step, last_time = self._last
        now = time.perf_counter()
        rate = (step - last_step) / (now - last_time) if now > last_time else 0.0
        self._last = (step, now)
        emit(
            f"step {step}/{self._total}  epoch {epoch + 1}  loss {loss:.4f}  lr {lr:.4g}  {rate:.2f} steps/s",
            sys.stdout,
        )

    def write(self, line: str) -> None:
        """A line that doesn't tear the bar."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            emit(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
