"""Allreduce stage and the rank-level plumbing around it.

Gradients go through Horovod (``hvd.DistributedOptimizer``). Everything else that crosses ranks
(metric sums, parameter digests) goes through mpi4py when Horovod runs over MPI, and through
Horovod's own collectives when it runs over Gloo (``horovodrun --gloo``), where there is no MPI world.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def launcher_rank() -> int:
    """This process's rank as the launcher announced it, before any initialisation (0 if none)."""
    for name in RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int
    _comm: Any = None  # an mpi4py communicator, or None for Horovod collectives

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> np.ndarray:
        """Element-wise sum over ranks (float64)."""
        local = np.asarray(values, dtype=np.float64)
        if self.size == 1:
            return local
        if self._comm is not None:
            total = np.empty_like(local)
            self._comm.Allreduce(local, total)
            return total
        import horovod.torch as hvd
        import torch

        return hvd.allreduce(torch.from_numpy(local), op=hvd.Sum, name="dali_ba.sum").numpy()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if self.size == 1:
            return [value]
        if self._comm is not None:
            return self._comm.allgather(value)
        import horovod.torch as hvd

        return hvd.allgather_object(value, name="dali_ba.gather")


def init_world() -> World:
    """Start Horovod (works alone, under horovodrun, mpirun and srun --mpi=pmix)."""
    import horovod.torch as hvd

    hvd.init()
    comm = None
    if hvd.size() > 1 and hvd.mpi_enabled():
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    return World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), comm)


class _ContiguousGradients:
    """Horovod compressor that only makes gradients contiguous (channels_last weights give NHWC-strided
    gradients, and Horovod's collectives take contiguous tensors only)."""

    @staticmethod
    def compress(tensor):
        return tensor.contiguous(), None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


def distributed_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, backward_passes: int):
    """Horovod's averaging optimizer; gradients of ``backward_passes`` micro-batches are summed first."""
    import horovod.torch as hvd

    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        backward_passes_per_step=backward_passes,
        compression=_ContiguousGradients,
    )


def _broadcast_inplace(tensor: torch.Tensor, name: str) -> None:
    import horovod.torch as hvd

    buffer = tensor.contiguous()
    hvd.broadcast_(buffer, root_rank=0, name=name)
    if buffer.data_ptr() != tensor.data_ptr():
        tensor.copy_(buffer)


def broadcast_from_root(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Make every rank hold rank 0's parameters, buffers and optimizer state.

    Not hvd.broadcast_parameters / broadcast_optimizer_state: those need contiguous tensors
    (channels_last weights are not), and for a fresh optimizer the latter takes a zero-gradient
    step to create state, which with weight decay moves the weights. A fresh optimizer has no
    state to send; a loaded one sends every state tensor, in parameter order.
    """
    import torch

    for name, tensor in model.state_dict().items():
        _broadcast_inplace(tensor, f"dali_ba.model.{name}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        for key, value in sorted(optimizer.state.get(param, {}).items()):
            if isinstance(value, torch.Tensor):
                _broadcast_inplace(value, f"dali_ba.optim.{index}.{key}")


def average_buffers(model: torch.nn.Module, world: World) -> None:
    """Average BatchNorm running statistics over ranks, so that all ranks evaluate one model.

    Each rank's BN layers see only its own shard; parameters are kept equal by the gradient
    allreduce, these buffers are not.
    """
    if world.size == 1:
        return
    import horovod.torch as hvd

    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            buf.copy_(hvd.allreduce(buf, op=hvd.Average, name=f"dali_ba.buffer.{name}"))


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters and buffers, in state_dict order: equal digests, equal models."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
