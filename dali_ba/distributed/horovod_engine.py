"""The Horovod engine (horovodrun, mpirun, srun --mpi=pmix): ``hvd.DistributedOptimizer`` averages
gradients; metric sums and gathers go through mpi4py when Horovod runs over MPI, through Horovod's
collectives over Gloo.

Its own module, away from :mod:`dali_ba.distributed.world`: Horovod is imported only here (and only
when this engine runs), so the other engines run where it is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dali_ba.distributed.world import GradientSync, World

if TYPE_CHECKING:
    import torch


class _ContiguousGradients:
    """Horovod compressor that only makes gradients contiguous (channels_last weights give NHWC-strided
    gradients, and Horovod's collectives take contiguous tensors only)."""

    @staticmethod
    def compress(tensor):
        return tensor.contiguous(), None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


class HorovodSync(GradientSync):
    """``hvd.DistributedOptimizer``: allreduces start in backward, ``step`` waits for them; gradients of
    ``chunks`` micro-batches are summed first (``backward_passes_per_step``)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, chunks: int) -> None:
        import horovod.torch as hvd

        super().__init__(
            model,
            hvd.DistributedOptimizer(
                optimizer,
                named_parameters=model.named_parameters(),
                backward_passes_per_step=chunks,
                compression=_ContiguousGradients,
            ),
        )

    def step(self, scaler: torch.amp.GradScaler | None) -> None:
        if not scaler:
            self.optimizer.step()
            return
        # fp16: unscale the allreduced gradients before the step (Horovod + GradScaler recipe)
        self.optimizer.synchronize()  # type: ignore[attr-defined]  # Horovod's DistributedOptimizer
        scaler.unscale_(self.optimizer)
        with self.optimizer.skip_synchronize():  # type: ignore[attr-defined]  # Horovod's DistributedOptimizer
            scaler.step(self.optimizer)
        scaler.update()


class HorovodWorld(World):
    engine = "horovod"

    def __init__(self, reason: str) -> None:
        import horovod.torch as hvd

        hvd.init()
        super().__init__(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), reason)
        self._comm = None  # mpi4py's world when Horovod runs over MPI; Horovod's collectives over Gloo
        if hvd.mpi_enabled():
            from mpi4py import MPI

            self._comm = MPI.COMM_WORLD
        self.backend = "mpi" if hvd.mpi_enabled() else "gloo"

    def _mpi(self) -> Any:
        """mpi4py's world (None over Gloo). Once another rank has left, Horovod has shut down here too
        and finalized MPI under this rank, where an mpi4py call aborts the process: this raises Horovod's
        own error instead, which the command reports as a peer gone (exit 1). The check narrows that
        window rather than closing it; the callers that know a peer is about to leave wait for it first
        (the barrier in :func:`dali_ba.training.shared_index.listed_once`), and the last collective before
        ranks leave is Horovod's own (:meth:`barrier`)."""
        if self._comm is not None:
            from mpi4py import MPI

            if MPI.Is_finalized():
                from horovod.common.exceptions import HorovodInternalError

                raise HorovodInternalError("MPI was finalized: another rank has left the job")
        return self._comm

    def barrier(self) -> None:
        """Horovod's own barrier, run by its background thread, not an mpi4py collective: this is the
        last collective before ranks leave. The first rank out shuts Horovod down on every rank, which
        finalizes MPI there; a peer still inside an mpi4py call at that moment crashed (SIGSEGV in
        MPI_Allreduce, seen once when a requeued job ended). Waiting on a Horovod handle, the main thread
        makes no MPI call of its own."""
        if self.size == 1:
            return
        import horovod.torch as hvd

        hvd.barrier()

    def topology(self) -> dict[str, int]:
        import horovod.torch as hvd

        return {**super().topology(), "cross_rank": hvd.cross_rank(), "cross_size": hvd.cross_size()}

    def sum(self, values: Sequence[float]) -> np.ndarray:
        local = np.asarray(values, dtype=np.float64)
        if self.size == 1:
            return local
        if (comm := self._mpi()) is not None:
            total = np.empty_like(local)
            comm.Allreduce(local, total)
            return total
        import horovod.torch as hvd
        import torch

        return hvd.allreduce(torch.from_numpy(local), op=hvd.Sum, name="dali_ba.sum").numpy()

    def gather(self, value: Any) -> list[Any]:
        if self.size == 1:
            return [value]
        if (comm := self._mpi()) is not None:
            return comm.allgather(value)
        import horovod.torch as hvd

        return hvd.allgather_object(value, name="dali_ba.gather")

    def broadcast_object(self, value: Any) -> Any:
        if self.size == 1:
            return value
        if (comm := self._mpi()) is not None:
            return comm.bcast(value, root=0)
        import horovod.torch as hvd

        return hvd.broadcast_object(value, root_rank=0, name="dali_ba.broadcast_object")

    def _broadcast_inplace(self, tensor: torch.Tensor, name: str) -> None:
        import horovod.torch as hvd

        buffer = tensor.contiguous()
        hvd.broadcast_(buffer, root_rank=0, name=name)
        if buffer.data_ptr() != tensor.data_ptr():
            tensor.copy_(buffer)

    def _average_inplace(self, tensor: torch.Tensor, name: str) -> None:
        import horovod.torch as hvd

        tensor.copy_(hvd.allreduce(tensor, op=hvd.Average, name=name))

    def gradient_sync(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, chunks: int) -> GradientSync:
        return HorovodSync(model, optimizer, chunks)

    def close(self) -> None:
        import horovod.torch as hvd

        hvd.shutdown()
