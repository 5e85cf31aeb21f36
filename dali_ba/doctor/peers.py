"""The ranks' gather, which cannot hang on a lost rank: a rank that never reports is named after
``--timeout``, not waited for (under every launcher but horovodrun --gloo, whose own timeout names none)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

from dali_ba.doctor.findings import first_line


class PeersLost(Exception):
    """This rank cannot finish the gather: rank 0, or the transport, is gone."""


class Alone:
    """One process."""

    rank, size = 0, 1

    def allgather(self, value: Any) -> list[Any]:
        return [value]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 (None elsewhere), once rank 0 holds them all."""
        return [value]

    def end(self, status: int, missing: bool) -> None:
        """Leave (``missing``: some rank never reported)."""


class MpiPeers:
    """mpi4py point to point with a deadline (MPI launchers: mpirun, srun --mpi=pmix, horovodrun over
    MPI): rank 0 collects, then answers each rank; a rank that never reports is named, not waited for."""

    def __init__(self, timeout: float) -> None:
        from mpi4py import MPI

        self.MPI, self.comm, self.timeout, self.tag = MPI, MPI.COMM_WORLD, timeout, 0
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.lost: set[int] = set()  # ranks that missed a gather: not waited for again

    def allgather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` on every rank; None in place of a rank that did not report in time."""
        return self._collect(value, everyone=True)

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 (None elsewhere, after rank 0 has them all: the others get a
        short answer, not everyone's findings)."""
        result = self._collect(value, everyone=False)
        return result if self.rank == 0 else None

    def _collect(self, value: Any, everyone: bool) -> list[Any]:
        self.tag += 1
        comm, deadline, status = self.comm, time.monotonic() + self.timeout, self.MPI.Status()
        if self.rank != 0:
            sent = comm.isend(value, dest=0, tag=self.tag)
            while not comm.iprobe(source=0, tag=self.tag):
                if time.monotonic() > deadline:
                    raise PeersLost(f"rank 0 did not answer within --timeout {self.timeout:g} s")
                time.sleep(0.005)
            result = comm.recv(source=0, tag=self.tag)
            sent.wait()
            return result
        got = {0: value}
        while len(got) + len(self.lost) < self.size and time.monotonic() < deadline:
            if comm.iprobe(source=self.MPI.ANY_SOURCE, tag=self.tag, status=status):
                source = status.Get_source()
                message = comm.recv(source=source, tag=self.tag)
                if source not in self.lost:
                    got[source] = message
            else:
                time.sleep(0.005)
        self.lost |= set(range(self.size)) - set(got)
        result = [got.get(rank) for rank in range(self.size)]
        sends = [comm.isend(result if everyone else True, dest=rank, tag=self.tag) for rank in got if rank]
        while not self.MPI.Request.Testall(sends) and time.monotonic() < deadline + self.timeout:
            time.sleep(0.005)
        return result

    def end(self, status: int, missing: bool) -> None:
        if missing:  # a lost rank would hold MPI_Finalize for ever: end the job now
            sys.stdout.flush()
            self.comm.Abort(status or 1)


class StorePeers:
    """torch.distributed's TCPStore with a deadline (torchrun, plain srun): each rank posts its value
    under a key of its own, rank 0 waits for the keys until ``--timeout`` and names the ranks whose key
    never came, then posts the answer. Under torchrun the agent's store serves; under srun rank 0's."""

    def __init__(self, launch, timeout: float) -> None:
        import datetime

        from torch.distributed import TCPStore

        self.rank, self.size, self.timeout, self.tag = launch.rank, launch.size, timeout, 0
        agent = launch.launcher == "torchrun"  # torchrun's agent serves MASTER_ADDR:MASTER_PORT
        port = launch.master_port or 29500
        self.store = TCPStore(
            launch.master_addr or "127.0.0.1",
            port,
            None,
            self.rank == 0 and not agent,
            timeout=datetime.timedelta(seconds=timeout),
            wait_for_workers=False,
        )
        self.lost: set[int] = set()

    def allgather(self, value: Any) -> list[Any]:
        return self._collect(value, everyone=True)

    def gather(self, value: Any) -> list[Any] | None:
        result = self._collect(value, everyone=False)
        return result if self.rank == 0 else None

    def _collect(self, value: Any, everyone: bool) -> list[Any]:
        import pickle

        self.tag += 1
        key = f"dali_ba/doctor/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{self.tag}"
        if self.rank != 0:
            self.store.set(f"{key}/{self.rank}", pickle.dumps(value))  # type: ignore[arg-type]  # Store.set takes bytes too
            try:
                self.store.wait([f"{key}/answer"])
            except Exception:
                raise PeersLost(f"rank 0 did not answer within --timeout {self.timeout:g} s") from None
            return pickle.loads(self.store.get(f"{key}/answer"))
        waiting, deadline = [r for r in range(1, self.size) if r not in self.lost], time.monotonic() + self.timeout
        while waiting and time.monotonic() < deadline:
            waiting = [r for r in waiting if not self.store.check([f"{key}/{r}"])]
            time.sleep(0.05)
        self.lost |= set(waiting)
        result = [value] + [
            None if r in self.lost else pickle.loads(self.store.get(f"{key}/{r}")) for r in range(1, self.size)
        ]
        self.store.set(f"{key}/answer", pickle.dumps(result if everyone else True))  # type: ignore[arg-type]  # Store.set takes bytes too
        return result

    def end(self, status: int, missing: bool) -> None:
        """Leave; a lost rank is the launcher's to end (torchrun and srun end the job when rank 0 fails)."""


class WorldPeers:
    """The project's own :class:`~dali_ba.distributed.world.World`: torch.distributed over Gloo (torchrun, plain
    srun) or Horovod over Gloo (horovodrun --gloo), each bounded by its own timeout."""

    def __init__(self, world) -> None:
        self.world, self.rank, self.size = world, world.rank, world.size

    def allgather(self, value: Any) -> list[Any]:
        try:
            return self.world.gather(value)
        except Exception as exc:
            raise PeersLost(f"not every rank reported ({first_line(exc)})") from None

    def gather(self, value: Any) -> list[Any] | None:
        everyone = self.allgather(value)
        return everyone if self.rank == 0 else None

    def end(self, status: int, missing: bool) -> None:
        with contextlib.suppress(Exception):
            self.world.close()


def join(launch, timeout: float):
    """The gather for this launcher: mpi4py under MPI launchers (Horovod need not work for it),
    Horovod's Gloo under horovodrun --gloo, torch.distributed's store under torchrun and plain srun."""
    from dali_ba.distributed.launcher import MPI_RANK_VARIABLES

    if launch.size <= 1:
        return Alone()
    if launch.launcher == "mpi":
        if any(os.environ.get(name, "").isdigit() for name in MPI_RANK_VARIABLES if name != "HOROVOD_RANK"):
            return MpiPeers(timeout)
        from dali_ba.distributed.horovod_engine import HorovodWorld

        return WorldPeers(HorovodWorld("horovodrun --gloo"))
    return StorePeers(launch, timeout)
