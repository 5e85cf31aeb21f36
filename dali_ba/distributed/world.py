"""Allreduce stage and the rank-level plumbing around it, for either engine.

A :class:`World` is this process's place among the ranks and the collectives the rest of dali-ba
uses (metric sums, gathers, the parameter broadcast at start, BatchNorm buffer averaging); its
:meth:`World.gradient_sync` averages gradients:

- ``horovod`` (horovodrun, mpirun, srun --mpi=pmix): ``hvd.DistributedOptimizer``; metric sums and
  gathers through mpi4py when Horovod runs over MPI, through Horovod's collectives over Gloo;
- ``torch`` (torchrun, plain srun): ``torch.distributed`` (NCCL on GPUs, Gloo on CPU) and
  ``DistributedDataParallel``; CPU-side collectives on a Gloo group beside NCCL;
- ``none``: one process, nothing to average.

Horovod is imported only by the Horovod engine, so the other two run where it is not installed.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import inspect
import socket
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dali_ba.device import timestamp
from dali_ba.distributed.launcher import EngineChoice, choose_engine
from dali_ba.distributed.placement import GpuPlacement, gpu_placement, gpu_sharing_error, training_device
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

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def step(self, scaler: torch.amp.GradScaler | None) -> None:
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()

    def backward_wait(self) -> tuple | None:
        return None


class World:
    """This process's place among the ranks, and the collectives; this base class: one process."""

    engine = "none"
    backend: str | None = None

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, local_size: int = 1,
                 reason: str = "one process, no launcher") -> None:
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


# Horovod ---------------------------------------------------------------------------------------------


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

        super().__init__(model, hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(), backward_passes_per_step=chunks,
            compression=_ContiguousGradients,
        ))

    def step(self, scaler: torch.amp.GradScaler | None) -> None:
        if not scaler:
            self.optimizer.step()
            return
        # fp16: unscale the allreduced gradients before the step (Horovod + GradScaler recipe)
        self.optimizer.synchronize()
        scaler.unscale_(self.optimizer)
        with self.optimizer.skip_synchronize():
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

    def topology(self) -> dict[str, int]:
        import horovod.torch as hvd

        return {**super().topology(), "cross_rank": hvd.cross_rank(), "cross_size": hvd.cross_size()}

    def sum(self, values: Sequence[float]) -> np.ndarray:
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
        if self.size == 1:
            return [value]
        if self._comm is not None:
            return self._comm.allgather(value)
        import horovod.torch as hvd

        return hvd.allgather_object(value, name="dali_ba.gather")

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


# torch.distributed -----------------------------------------------------------------------------------


class DDPSync(GradientSync):
    """``DistributedDataParallel``: bucketed allreduces start in backward and the last backward waits
    for them; all but the last of ``chunks`` micro-batches run under ``no_sync()`` (one allreduce per
    step). A comm hook notes when the last bucket was handed over, so that the wait inside backward
    can be told apart from the backward computation (``backward_wait``)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None,
            # BN statistics stay per rank until the epoch-end average (as Horovod)
            **{_ddp_buffer_sync_keyword(DistributedDataParallel): False},
        )
        super().__init__(ddp, optimizer)
        self._device = device
        self._ready: Any = None  # perf_counter (CPU) or CUDA event of the newest bucket handed to DDP
        self._done: Any = None
        ddp.register_comm_hook(None, self._allreduce_hook)

    def _allreduce_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self._ready = timestamp(self._device)
        return allreduce_hook(state, bucket)  # the default: divide by the world size, then sum

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        if last:
            return _after(self._mark_done)
        return self.model.no_sync()

    def _mark_done(self) -> None:
        self._done = timestamp(self._device)

    def backward_wait(self) -> tuple | None:
        if self._ready is None or self._done is None:
            return None
        span, self._ready, self._done = (self._ready, self._done), None, None
        return span


def buffer_sync_keyword(parameters: Collection[str]) -> str:
    """DDP's keyword that turns off its buffer broadcast in forward: ``forward_sync_buffers`` from
    torch 2.13, ``broadcast_buffers`` before (torch 2.11 on many clusters); ``parameters``: its names."""
    return "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"


@functools.lru_cache(maxsize=None)
def _ddp_buffer_sync_keyword(ddp_class: type) -> str:
    """:func:`buffer_sync_keyword` of the installed DistributedDataParallel (its signature, read once)."""
    return buffer_sync_keyword(inspect.signature(ddp_class.__init__).parameters)


@contextlib.contextmanager
def _after(callback):
    yield
    callback()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class TorchWorld(World):
    engine = "torch"

    def __init__(self, choice: EngineChoice, device_type: str, timeout_s: float = 600, share_gpu: bool = False) -> None:
        import torch.distributed as dist

        launch = choice.launch
        addr, port = launch.master_addr, launch.master_port
        if launch.launcher == "none":  # --engine torch as one process: a world of one on this machine
            addr, port = "127.0.0.1", _free_port()
        elif addr is None:  # mpirun without torchrun or SLURM: rank 0 names the rendezvous over MPI
            from mpi4py import MPI

            addr, port = MPI.COMM_WORLD.bcast((socket.gethostname(), _free_port()) if launch.rank == 0 else None)
        # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"); Gloo takes CUDA tensors too.
        self.backend = "nccl" if device_type == "cuda" and not share_gpu else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        # torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT: join it through env://.
        init = "env://" if launch.launcher == "torchrun" else f"tcp://{_url_host(addr)}:{port or 29500}"
        dist.init_process_group(self.backend, init_method=init, rank=launch.rank, world_size=launch.size,
                                timeout=timeout)
        # CPU-side collectives (metric sums, object gathers) need Gloo beside NCCL.
        self._cpu_group = dist.new_group(backend="gloo", timeout=timeout) if self.backend == "nccl" else None
        hosts = self._gather_objects(socket.gethostname())
        local = [rank for rank, host in enumerate(hosts) if host == hosts[launch.rank]]
        super().__init__(launch.rank, launch.size, local.index(launch.rank), len(local), choice.reason)

    def _gather_objects(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value, group=self._cpu_group)
        return out

    def sum(self, values: Sequence[float]) -> np.ndarray:
        import torch
        import torch.distributed as dist

        total = torch.tensor(np.asarray(values, dtype=np.float64))
        dist.all_reduce(total, group=self._cpu_group)
        return total.numpy()

    def gather(self, value: Any) -> list[Any]:
        return self._gather_objects(value)

    def _broadcast_inplace(self, tensor: torch.Tensor, name: str) -> None:
        import torch.distributed as dist

        buffer = tensor.contiguous()
        dist.broadcast(buffer, src=0)
        if buffer.data_ptr() != tensor.data_ptr():
            tensor.copy_(buffer)

    def _average_inplace(self, tensor: torch.Tensor, name: str) -> None:
        import torch.distributed as dist

        total = tensor.contiguous()
        dist.all_reduce(total)
        tensor.copy_(total.div_(self.size))

    def gradient_sync(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, chunks: int) -> GradientSync:
        device = next(model.parameters()).device
        return DDPSync(model, optimizer, device)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def init_world(engine: EngineChoice | str = "auto", device_type: str | None = None, share_gpu: bool = False) -> World:
    """Join the ranks with ``engine`` (auto, horovod, torch, or a :func:`choose_engine` answer) as the
    launcher calls for. ``device_type`` (cuda or cpu; default: cuda when a GPU is visible) picks the
    torch engine's backend: NCCL on GPUs, Gloo on CPU or where ranks share a GPU (``share_gpu``).
    """
    choice = engine if isinstance(engine, EngineChoice) else choose_engine(engine)
    if choice.engine == "horovod":
        return HorovodWorld(choice.reason)
    if choice.engine == "torch":
        if device_type is None:
            import torch

            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if device_type == "cuda":
            import torch

            torch.cuda.set_device(training_device(choice.launch.local_rank))  # NCCL binds to the current device
        return TorchWorld(choice, device_type, share_gpu=share_gpu)
    return World(reason=choice.reason)


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
