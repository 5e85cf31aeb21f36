"""The world every stage above talks to, and what both engines share.

A :class:`World` is this process's place among the ranks and the collectives the rest of dali-ba
uses (metric sums, gathers, the parameter broadcast at start, BatchNorm buffer averaging); its
:meth:`World.gradient_sync` averages gradients (a :class:`GradientSync`). These base classes are the
``none`` engine: one process, nothing to average. The engines subclass them, each in its own module
so that the other runs where its library is not installed:

- ``horovod`` (horovodrun, mpirun, srun --mpi=pmix): :mod:`dali_ba.distributed.horovod_engine`;
- ``torch`` (torchrun, plain srun): :mod:`dali_ba.distributed.torch_engine`.

:func:`dali_ba.distributed.join.init_world` picks one as the launcher calls for. Also here, the same
for every engine: :func:`check_gpu_sharing` and :func:`parameter_digest`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dali_ba.distributed.placement import GpuPlacement, gpu_placement, gpu_sharing_error
from dali_ba.errors import UsageError

if TYPE_CHECKING:
    import torch


class GradientSync:
    """How one step's gradients are averaged over ranks; this base: one process, nothing to average.

    ``model`` is what the forward pass runs (DDP's wrapper for the torch engine), ``optimizer`` what
    steps (Horovod's wrapper for the Horovod engine). ``micro_batch(last)`` wraps each chunk's
    forward + backward; ``step(scaler)`` ends the step; ``backward_wait()`` is the part of the last
    backward pass spent waiting for allreduces (DDP waits inside backward): a span of two
    :func:`dali_ba.device.timestamp` values, or None.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def step(self, scaler: torch.amp.GradScaler | None) -> None:
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()

    def backward_wait(self) -> tuple[Any, Any] | None:
        return None


class World:
    """This process's place among the ranks, and the collectives; this base class: one process."""

    engine = "none"
    backend: str | None = None

    def __init__(
        self,
        rank: int = 0,
        size: int = 1,
        local_rank: int = 0,
        local_size: int = 1,
        reason: str = "one process, no launcher",
    ) -> None:
        self.rank, self.size, self.local_rank, self.local_size, self.reason = rank, size, local_rank, local_size, reason

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """The engine as the start record and environment.json name it."""
        return {"engine": self.engine, "backend": self.backend, "reason": self.reason}

    def topology(self) -> dict[str, int]:
        """This rank's place on its node, as the engine sees it (environment.json, per rank)."""
        return {"local_rank": self.local_rank, "local_size": self.local_size}

    def sum(self, values: Sequence[float]) -> np.ndarray:
        """Element-wise sum over ranks (float64)."""
        return np.asarray(values, dtype=np.float64)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        return [value]

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` (picklable) on every rank: the others pass anything (None) and get rank 0's.
        Over the engine's own channel (a tree broadcast under MPI), not the file system."""
        return value

    def _broadcast_inplace(self, tensor: torch.Tensor, name: str) -> None:
        """Overwrite ``tensor`` with rank 0's (in place, whatever its memory format)."""

    def _average_inplace(self, tensor: torch.Tensor, name: str) -> None:
        """Overwrite ``tensor`` with its mean over ranks."""

    def broadcast_from_root(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Make every rank hold rank 0's parameters, buffers and optimizer state.

        Not hvd.broadcast_parameters / broadcast_optimizer_state: those need contiguous tensors
        (channels_last weights are not), and for a fresh optimizer the latter takes a zero-gradient
        step to create state, which with weight decay moves the weights. A fresh optimizer has no
        state to send; a loaded one sends every state tensor, in parameter order.
        """
        import torch

        if self.size == 1:
            return
        for name, tensor in model.state_dict().items():
            self._broadcast_inplace(tensor, f"dali_ba.model.{name}")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, param in enumerate(params):
            for key, value in sorted(optimizer.state.get(param, {}).items()):
                if isinstance(value, torch.Tensor):
                    self._broadcast_inplace(value, f"dali_ba.optim.{index}.{key}")

    def average_buffers(self, model: torch.nn.Module) -> None:
        """Average BatchNorm running statistics over ranks, so that all ranks evaluate one model.

        Each rank's BN layers see only its own shard; parameters are kept equal by the gradient
        allreduce, these buffers are not.
        """
        if self.size == 1:
            return
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                self._average_inplace(buf, f"dali_ba.buffer.{name}")

    def gradient_sync(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, chunks: int) -> GradientSync:
        """The gradient averaging of this engine around ``model`` and ``optimizer``."""
        return GradientSync(model, optimizer)

    def barrier(self) -> None:
        """Wait until every rank is here (before ranks exit together, so that rank 0's last writes are
        done before a launcher that ends a job on its first failed rank sees one)."""
        self.sum([0.0])

    def close(self) -> None:
        """Leave the world (end of run)."""


def check_gpu_sharing(world: World, device: torch.device, share_gpu: bool) -> None:
    """Collective: UsageError on every rank if two ranks of a node would train on one GPU and
    ``share_gpu`` is off. Before the first NCCL collective, which would fail less clearly."""
    placements = [GpuPlacement(*place) for place in world.gather(tuple(gpu_placement(device)))]
    error = gpu_sharing_error(placements, share_gpu)
    if error:
        raise UsageError(error)


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters and buffers, in state_dict order: equal digests, equal models."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
