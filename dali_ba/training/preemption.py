"""Stopping on SLURM's warning signal: finish the step, checkpoint, exit with a code that says so.

SLURM sends SIGUSR1 (``--signal=B:USR1@<grace>``, forwarded by the batch script) or SIGTERM
(preemption, ``scancel``) to every task. The handler only raises a flag; after each step the ranks
agree on it (any rank signalled stops all of them), so every rank stops after the same step.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import FrameType

    from dali_ba.distributed.world import World

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped on a signal after a checkpoint; run again with --resume auto
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Installs handlers for SIGUSR1 and SIGTERM; ``agreed(world)`` says whether any rank got one."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, world: World) -> bool:
        """Collective: True on every rank if any rank has been signalled."""
        return world.sum([1.0 if self.signal_name else 0.0])[0] > 0


def ignore_stop_signals() -> None:
    """From here on this process only leaves: a launcher's SIGTERM (torchrun and mpirun send one to every
    rank still running as soon as one rank exits non-zero) must not turn the exit code it has decided
    into a death by signal. Ignored, not handled: the interpreter's finalization puts Python handlers
    back to the default, which kills, but leaves an ignored signal ignored."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
