"""The torch.distributed engine (torchrun, plain srun): NCCL on GPUs, Gloo on CPU, and
``DistributedDataParallel`` to average gradients; CPU-side collectives on a Gloo group beside NCCL.

Its own module, beside :mod:`dali_ba.distributed.horovod_engine`: each engine's library is imported
only by the engine that uses it.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import socket
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from dali_ba.device import timestamp
from dali_ba.distributed.launcher import EngineChoice
from dali_ba.distributed.world import GradientSync, World

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup


class DDPSync(GradientSync):
    """``DistributedDataParallel``: bucketed allreduces start in backward and the last backward waits
    for them; all but the last of ``chunks`` micro-batches run under ``no_sync()`` (one allreduce per
    step). A comm hook notes when the last bucket was handed over, so that the wait inside backward
    can be told apart from the backward computation (``backward_wait``)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            # BN statistics stay per rank until the epoch-end average (as Horovod)
            **{_ddp_buffer_sync_keyword(DistributedDataParallel): False},  # type: ignore[arg-type]  # the keyword's name depends on torch's version
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
        return self.model.no_sync()  # type: ignore[operator]  # the model is the DistributedDataParallel wrapper

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


@functools.cache
def _ddp_buffer_sync_keyword(ddp_class: type) -> str:
    """:func:`buffer_sync_keyword` of the installed DistributedDataParallel (its signature, read once)."""
    return buffer_sync_keyword(inspect.signature(ddp_class.__init__).parameters)  # type: ignore[misc]  # the class's own __init__, read on purpose


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
        dist.init_process_group(
            self.backend, init_method=init, rank=launch.rank, world_size=launch.size, timeout=timeout
        )
        # CPU-side collectives (metric sums, object gathers) need Gloo beside NCCL.
        # every rank is in the group: new_group never returns its NON_GROUP_MEMBER marker (-100) here
        self._cpu_group = cast(
            "ProcessGroup | None", dist.new_group(backend="gloo", timeout=timeout) if self.backend == "nccl" else None
        )
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

    def broadcast_object(self, value: Any) -> Any:
        import torch.distributed as dist

        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._cpu_group)  # Gloo: the object stays on the CPU
        return box[0]

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
