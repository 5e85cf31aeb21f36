"""What this process is doing now, for the stall watch (:mod:`dali_ba.training.stall`) to report:
the phase of the step, the reads of sample files in flight and since when, and the stall clock.

Written by the stages as they work (the step clock's phases, the reader's threads, the trainer's
epochs) and read by another thread; every update is one assignment, so it costs nothing per step.
The stall clock runs only while armed: from the end of the first step of each epoch or resume, and
paused for evaluation and checkpoints, whose time has nothing to do with a step's.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Activity:
    phase: str = "start"  # a step's phase (data, h2d, forward_backward, allreduce_step) or what runs between steps
    phase_since: float = field(default_factory=time.monotonic)
    step: int = 0  # steps finished by this process (over the run and those it resumes)
    armed: bool = False  # the stall clock runs
    progress_at: float = field(default_factory=time.monotonic)  # last step's end (or the clock's arming)
    reads: dict[int, tuple[str, float]] = field(default_factory=dict)  # thread id -> (sample, since)
    writing: int = 0  # files being written that must not be left half-written (checkpoints)
    changed: threading.Event = field(default_factory=threading.Event)  # the clock started or stopped: post now

    def set_phase(self, name: str) -> None:
        self.phase, self.phase_since = name, time.monotonic()

    def step_done(self, step: int) -> None:
        self.step, self.progress_at = step, time.monotonic()

    def arm(self) -> None:
        """Start the stall clock now (after a first step: graph building and compilation are behind)."""
        self.progress_at, self.armed = time.monotonic(), True
        self.changed.set()

    def disarm(self, phase: str) -> None:
        """Stop the stall clock for ``phase`` (evaluation, the run's end)."""
        self.armed = False
        self.set_phase(phase)
        self.changed.set()

    @contextlib.contextmanager
    def paused(self, phase: str) -> Iterator[None]:
        """The stall clock stopped during ``phase`` (a checkpoint), then running again from its end."""
        armed, previous = self.armed, self.phase
        self.disarm(phase)
        try:
            yield
        finally:
            self.set_phase(previous)
            if armed:
                self.arm()

    @contextlib.contextmanager
    def reading(self, sample: str) -> Iterator[None]:
        """A read of ``sample`` in flight on this thread: a stall at any moment once it lasts too long."""
        thread = threading.get_ident()
        self.reads[thread] = (sample, time.monotonic())
        try:
            yield
        finally:
            self.reads.pop(thread, None)

    @contextlib.contextmanager
    def writing_file(self) -> Iterator[None]:
        """A file being written: a stall ends this process only after it (none is left half-written)."""
        self.writing += 1
        try:
            yield
        finally:
            self.writing -= 1

    def oldest_read(self) -> tuple[str, float] | None:
        """The read in flight for longest: (sample, seconds so far), or None."""
        reads = list(self.reads.values())  # a copy: the reader's threads change the dict meanwhile
        if not reads:
            return None
        sample, since = min(reads, key=lambda read: read[1])
        return sample, time.monotonic() - since


ACTIVITY = Activity()  # this process's
