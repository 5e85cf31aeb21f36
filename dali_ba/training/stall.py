"""The stall rule: a rank that hangs ends the job within ``--stall-timeout``, named, with an exit
code of its own (:data:`EXIT_STALLED`), where a dead rank already ends it at once.

A hung rank cannot speak for itself, and the ranks waiting for it sit inside a collective that
never returns; so each rank runs a thread beside training that posts, every few seconds, what its
process is doing (:mod:`dali_ba.activity`: the step's phase, the stall clock, the oldest read in
flight) to a side channel no collective touches: a torch.distributed ``TCPStore`` served by rank 0.
Rank 0's thread reads every rank's posts and judges (:func:`judge`):

- a rank whose posts stop (the whole process stopped or frozen, not even this thread runs) is
  silent; its last post says what it was doing;
- a read of one sample that has not returned after the timeout is a stall at any moment (the
  file system does not answer), named by file or shard member;
- a rank whose stall clock has run past the timeout finished no step for that long.

A slow rank keeps posting and finishing steps: it is never ended. When rank 0 itself is frozen the
store does not answer; rank 1 then names rank 0. The judge prints one line, and every rank that can
still act leaves with EXIT_STALLED; the launcher (srun --kill-on-bad-exit, mpirun, torchrun) ends
the rest. A checkpoint being written is finished first, so none is left half-written.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from dali_ba.activity import ACTIVITY, Activity

if TYPE_CHECKING:
    from torch.distributed import TCPStore

    from dali_ba.distributed.world import World

EXIT_STALLED = 76  # EX_PROTOCOL: a rank stopped answering; run again with --resume auto (SLURM requeues)
VERDICT = "stall/verdict"


@dataclass
class Beat:
    """One rank's post: what it does now, by its own clock (no clocks are compared across nodes)."""

    rank: int
    host: str
    pid: int
    seq: int  # grows with every post: a rank whose seq stands still is silent
    phase: str
    phase_s: float  # in this phase for so long
    step: int  # steps finished
    idle_s: float | None  # the stall clock: seconds since the last step's end, None while paused
    read: tuple[str, float] | None  # the oldest read in flight: (sample, seconds)

    @classmethod
    def of(cls, activity: Activity, rank: int, host: str, seq: int) -> Beat:
        now = time.monotonic()
        return cls(
            rank,
            host,
            os.getpid(),
            seq,
            activity.phase,
            now - activity.phase_since,
            activity.step,
            now - activity.progress_at if activity.armed else None,
            activity.oldest_read(),
        )


def judge(beats: list[Beat], silent_s: list[float], timeout: float, grace: float = 0.0) -> list[tuple[int, str]] | None:
    """The stalled ranks, each with what it waits for, or None when none is: ``beats[r]`` is rank r's
    last post and ``silent_s[r]`` how long ago it last changed. A silent rank last seen with its clock
    paused (evaluation, a checkpoint) gets three timeouts: such phases have no step to wait for. No rank
    is judged merely idle while another has not posted for ``grace`` seconds: the peers of a rank that
    froze go idle when it does, and the frozen one is the one to name."""
    silent, reading, idle = [], [], []
    for beat, quiet in zip(beats, silent_s):
        if quiet > timeout and (beat.idle_s is not None or beat.read or quiet > 3 * timeout):
            silent.append(
                (
                    beat.rank,
                    f"{SILENT} for {quiet:.0f} s (stopped or frozen: its stall watch does not post), "
                    f"last seen in {_doing(beat)}",
                )
            )
        elif beat.read and beat.read[1] > timeout:
            reading.append((beat.rank, f"waiting {beat.read[1]:.0f} s on a read of {beat.read[0]} ({_doing(beat)})"))
        elif beat.idle_s is not None and beat.idle_s > timeout:
            idle.append(
                (beat.rank, f"no step finished for {beat.idle_s:.0f} s, in {_doing(beat)} for {beat.phase_s:.0f} s")
            )
    if silent or reading:
        return sorted(silent + reading)
    if not idle or (grace and max(silent_s) > grace):  # idle, or waiting for one falling silent
        return None
    # Every rank idle: those in a phase the others are not in hold them up (a GPU that stopped answering
    # in forward_backward while the others wait in allreduce_step); where all are alike, all are named.
    phases = [beats[rank].phase for rank, _ in idle]
    common = max(set(phases), key=phases.count)
    odd = [entry for entry, phase in zip(idle, phases) if phase != common]
    return odd if odd and len(odd) < len(idle) else idle


def _doing(beat: Beat) -> str:
    return f"{beat.phase} of step {beat.step + 1}" if beat.phase in STEP_PHASES else beat.phase


STEP_PHASES = ("data", "h2d", "forward_backward", "allreduce_step")
SILENT = "silent"


def stall_line(stalled: list[tuple[int, str]], beats: list[Beat], timeout: float, checkpoint: str | None) -> str:
    """The one line: who stalled and on what, where the others wait, the last good checkpoint, the exit."""
    named = {rank for rank, _ in stalled}
    parts = [f"rank {rank} (node {beats[rank].host}) {what}" for rank, what in stalled]
    others: dict[str, list[int]] = {}
    for beat in beats:
        if beat.rank not in named:
            others.setdefault(beat.phase, []).append(beat.rank)
    waits = "; ".join(
        f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} wait{'' if len(ranks) > 1 else 's'} "
        f"in {phase}"
        for phase, ranks in others.items()
    )
    return (
        f"stalled (--stall-timeout {timeout:g}): {'; '.join(parts)}{'; ' + waits if waits else ''}; "
        f"the last good checkpoint is {checkpoint or 'none (the run starts afresh)'}; every rank ends with exit "
        f"{EXIT_STALLED}: run again with --resume auto"
    )


class StallWatch:
    """The thread of one rank (see the module). ``start`` is collective; ``stop`` ends the thread."""

    def __init__(
        self,
        world: World,
        timeout: float,
        last_checkpoint: Callable[[], str | None],
        say: Callable[[str], None],
        activity: Activity = ACTIVITY,
    ) -> None:
        self.world, self.timeout, self.last_checkpoint, self.say, self.activity = (
            world,
            timeout,
            last_checkpoint,
            say,
            activity,
        )
        self.interval = max(0.5, min(5.0, timeout / 6))
        self.host = socket.gethostname()
        # rank 0 serves the store for as long as it lives; every rank is a client
        self._server: TCPStore | None = None
        self._store: TCPStore | None = None
        self._done = threading.Event()
        self._wait = datetime.timedelta(seconds=max(5.0, 2 * self.interval))  # the longest a store call takes
        self._thread = threading.Thread(target=self._run, name="dali-ba-stall-watch", daemon=True)

    def start(self) -> StallWatch:
        """Collective (every rank, after the world is joined): the side channel, then the thread."""
        if self.timeout <= 0:
            return self
        if self.world.size > 1:
            from torch.distributed import TCPStore

            wait = self._wait
            server = (
                TCPStore("0.0.0.0", 0, None, True, timeout=wait, wait_for_workers=False)
                if self.world.rank == 0
                else None
            )
            host, port = self.world.gather((self.host, server.port) if server else None)[0]
            self._server = server
            self._store = server or TCPStore(host, port, None, False, timeout=wait)
            self._post(0)
            self.world.barrier()  # every rank has posted once: the judge reads no missing key
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread and wait for it: a daemon thread still inside a store call (C++, the GIL
        released) when the interpreter exits is ended by CPython in the middle of a C++ destructor, and
        the process aborts (SIGABRT) instead of leaving with its exit code."""
        self._done.set()
        self.activity.changed.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._wait.total_seconds() + 1)  # a store call returns within its timeout

    # --- the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        seq, rank, size = 0, self.world.rank, self.world.size
        seen: list[tuple[int, float]] = [(0, time.monotonic())] * size  # each rank's last seq, and when it changed
        last: list[Beat] = [Beat.of(self.activity, r, self.host, 0) for r in range(size)]
        store_lost = None  # since when the store has not answered
        while not self._done.is_set():
            self.activity.changed.wait(
                self.interval
            )  # a post every interval, and at once when the clock starts or stops
            self.activity.changed.clear()
            if self._done.is_set():  # stop(): no store call now, the process is on its way out
                break
            seq += 1
            try:
                self._post(seq)
                if rank == 0:
                    last = (
                        [Beat(**json.loads(raw)) for raw in self._store.multi_get([f"beat/{r}" for r in range(size)])]  # type: ignore[union-attr]  # set whenever size > 1
                        if size > 1
                        else [Beat.of(self.activity, 0, self.host, seq)]
                    )
                elif self._store.check([VERDICT]):  # type: ignore[union-attr]  # set whenever size > 1
                    self._leave([Beat(**beat) for beat in json.loads(self._store.get(VERDICT))])  # type: ignore[union-attr]  # set whenever size > 1
                elif rank == 1:
                    last[0] = Beat(**json.loads(self._store.get("beat/0")))  # type: ignore[union-attr]  # set whenever size > 1
                store_lost = None
            except Exception:
                store_lost = store_lost or time.monotonic()
                if time.monotonic() - store_lost > self.timeout:
                    if rank == 1:  # rank 0 cannot speak: rank 1 names it
                        quiet = time.monotonic() - seen[0][1]
                        self.say(
                            stall_line(
                                [
                                    (
                                        0,
                                        f"{SILENT} for {quiet:.0f} s (stopped or frozen: the stall watch's "
                                        f"store it serves does not answer), last seen in {_doing(last[0])}",
                                    )
                                ],
                                [last[0]],
                                self.timeout,
                                self.last_checkpoint(),
                            )
                        )
                    self._leave([last[0]])
                continue
            now = time.monotonic()
            for r, beat in enumerate(last if rank == 0 else last[:1]):
                if beat.seq != seen[r][0]:
                    seen[r] = (beat.seq, now)
            if rank == 0:
                stalled = judge(last, [now - seen[r][1] for r in range(size)], self.timeout, 2 * self.interval)
                if stalled:
                    line = stall_line(stalled, last, self.timeout, self.last_checkpoint())
                    self.say(line)
                    frozen = [last[rank] for rank, what in stalled if what.startswith(SILENT)]
                    if self._store is not None:  # every rank that can still act leaves on it, before this one
                        self._store.set(VERDICT, json.dumps([asdict(beat) for beat in frozen]))
                        time.sleep(2 * self.interval)  # (the store's server) is gone
                    self._leave(frozen)

    def _post(self, seq: int) -> None:
        if self._store is not None:
            beat = Beat.of(self.activity, self.world.rank, self.host, seq)
            self._store.set(f"beat/{self.world.rank}", json.dumps(asdict(beat)))

    def _leave(self, frozen: list[Beat]) -> None:
        """Exit now with EXIT_STALLED, from this thread (the main one may never return): after a
        checkpoint being written, so that none is left half-written. A frozen rank of this node is
        killed two seconds later: it cannot leave by itself, and a launcher that asks it to (torchrun's
        SIGTERM) waits half a minute before it kills it; this rank's exit reaches the launcher first,
        so the job's status is EXIT_STALLED, not a killed rank's."""
        pids = [str(beat.pid) for beat in frozen if beat.host == self.host and beat.pid != os.getpid()]
        if pids:
            with contextlib.suppress(OSError):
                subprocess.Popen(
                    ["sh", "-c", f"sleep 2; kill -9 {' '.join(pids)} 2>/dev/null"],
                    start_new_session=True,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
        deadline = time.monotonic() + 600
        while self.activity.writing and time.monotonic() < deadline:
            time.sleep(0.2)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(EXIT_STALLED)
