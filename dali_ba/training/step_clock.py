"""Where each step's time goes on this rank: the step clock, one row of phase times per step.

A step is timed as consecutive phases on each rank -- waiting for the loader (``data``), moving the
batch to the device (``h2d``), forward + backward (``forward_backward``) and the wait for the gradient
allreduce + the optimizer step (``allreduce_step``: Horovod's wait in its optimizer, or DDP's wait at
the end of backward, moved here from forward_backward) -- so the phases add up to the step. On a GPU
torch's stream is synchronised before each clock reading and every phase is an NVTX range (``nsys`` shows
them). Ranks keep their own rows; :mod:`dali_ba.training.step_times` gathers them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dali_ba.activity import ACTIVITY
from dali_ba.device import seconds_between, timestamp

if TYPE_CHECKING:
    import torch

PHASES = ("data", "h2d", "forward_backward", "allreduce_step")
COLUMNS = (*PHASES, "step")  # what one rank records per step, in seconds


def stream_sync(device: torch.device) -> Callable[[], None]:
    """Wait for torch's own CUDA stream only (a no-op on CPU): a device-wide sync would also wait for
    DALI's prefetching of the next batches and charge it to the step."""
    import torch

    from dali_ba import strict_device

    if device.type != "cuda":
        return (
            (lambda: strict_device.record("the step clock's stream sync"))
            if strict_device.is_device(device)
            else (lambda: None)
        )
    return lambda: torch.cuda.current_stream(device).synchronize()


@dataclass
class StepRow:
    """One step's timestamps, read later (:meth:`seconds`): consecutive marks (phase name, stamp)
    from the step's start, and the spans to charge to another phase (DDP's wait inside backward)."""

    marks: list[tuple[str | None, object]]
    moves: list[tuple[str, str, object, object]]

    def seconds(self) -> list[float]:
        """The phase times and the whole step (first mark to last), seconds: the phases add up to it."""
        times = dict.fromkeys(PHASES, 0.0)
        for (_, start), (name, end) in zip(self.marks, self.marks[1:]):
            times[name] += seconds_between(start, end)  # type: ignore[index]  # only the first mark (the start) is nameless
        for source, target, start, end in self.moves:
            moved = min(max(seconds_between(start, end), 0.0), times[source])
            times[source] -= moved
            times[target] += moved
        return [times[p] for p in PHASES] + [seconds_between(self.marks[0][1], self.marks[-1][1])]


class StepClock:
    """Times the phases of one step on this rank; ``phase(name)`` is a context manager.

    Phases are back to back: each runs from the end of the one before (or the step's start), so the
    little Python between them (or a moment the process was descheduled there) is charged to the next
    phase and the phases add up to the step exactly. On a GPU the marks are CUDA events on torch's
    stream: nothing waits for the GPU during a step, and a step's times are read (one wait) only
    when its row is, every ``--log-every`` steps. A phase's time is then when the stream finished
    its work, or, when the stream had run dry (waiting for data), when the host queued the next.
    """

    def __init__(self, device: torch.device):
        import torch

        from dali_ba import strict_device

        self._device = device
        self._sync = stream_sync(device)
        self._mark_step = strict_device.mark_step
        self._nvtx = torch.cuda.nvtx if device.type == "cuda" else None
        self._row = StepRow([], [])

    def sync(self) -> None:
        """Wait for the device's queued work (a no-op on CPU)."""
        self._sync()

    def begin(self) -> None:
        self._mark_step()  # under the strict device mode, the syncs from here on are this step's
        self._row = StepRow([(None, timestamp(self._device))], [])

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        ACTIVITY.set_phase(name)  # what the stall watch names when a step never ends
        if self._nvtx:
            self._nvtx.range_push(name)
        try:
            yield
        finally:
            self._row.marks.append((name, timestamp(self._device)))  # GPU work queued in this phase is charged to it
            if self._nvtx:
                self._nvtx.range_pop()

    def move(self, source: str, target: str, span: tuple[object, object] | None) -> None:
        """Charge the ``span`` (two timestamps) of phase ``source`` to ``target`` instead (at most
        all of ``source``); None: nothing to move."""
        if span is not None:
            self._row.moves.append((source, target, *span))

    def end(self) -> StepRow:
        """This step's row, to be read (``row.seconds()``) when it is logged."""
        return self._row
