"""Where a run's start-up goes: a clock of named phases, from the command's start to its first step.

``dali_ba.train`` starts a :class:`StartupClock` first thing and times its phases where they happen:
joining the ranks (``engine``), the data set's index (``index``: rank 0 lists, the others receive), the
model (``model``, in :func:`dali_ba.training.rank_setup.setup_training`), the loader's DALI pipeline
(``dali_graph``: it is built when the first batch is asked for, so this is the time to that batch) and
the rest of the first step (``first_step``). A phase timed inside another is left out of the outer one,
so the phases never overlap; what none covers is ``other`` (importing torch, torchvision and DALI, the
arguments and checks, the validation loaders, the weights' broadcast or a checkpoint's load, the run
folder's first files), and with it they add up to the clock's time (:meth:`~StartupClock.summary`). Rank
0 records and says them (:mod:`dali_ba.training.reporter`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


class StartupClock:
    """Seconds per named phase of a rank's start-up, and since the clock was made."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._seconds: dict[str, float] = {}  # in the order the phases were first timed
        self._inner: list[float] = []  # per open phase: the seconds of the phases timed inside it

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (added to its seconds so far), less the phases timed inside it."""
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self._seconds[name] = self._seconds.get(name, 0.0) + elapsed - self._inner.pop()
            if self._inner:
                self._inner[-1] += elapsed

    def first_item(self, name: str, items: Iterator[T]) -> Iterator[T]:
        """``items``, the wait for the first one timed as ``name`` (when it is asked for)."""
        with self.phase(name):
            try:
                first = next(items)
            except StopIteration:
                return
        yield first
        yield from items

    def seconds(self) -> dict[str, float]:
        """Each phase timed so far, in seconds (to the microsecond), in the order they were first timed."""
        return {name: round(max(seconds, 0.0), 6) for name, seconds in self._seconds.items()}

    def elapsed(self) -> float:
        """Seconds since the clock was made."""
        return time.perf_counter() - self._start

    def summary(self) -> dict[str, float]:
        """:meth:`seconds`, then ``other`` (the seconds no phase covers) and ``total`` (since the clock
        was made): ``other`` and the phases add up to ``total``."""
        total = self.elapsed()
        phases = self.seconds()
        return {**phases, "other": round(max(total - sum(phases.values()), 0.0), 6), "total": round(total, 6)}


LABELS = {"dali_graph": "DALI graph", "first_step": "first step"}


def startup_line(seconds: dict[str, float]) -> str:
    """The console's line: ``seconds`` is a :meth:`StartupClock.summary` (the phases, ``other``, ``total``)."""
    parts = ", ".join(
        f"{LABELS.get(name, name.replace('_', ' '))} {value:.1f} s"
        for name, value in seconds.items()
        if name != "total"
    )
    return f"start-up: {parts} ({seconds['total']:.1f} s to the end of the first step)"
