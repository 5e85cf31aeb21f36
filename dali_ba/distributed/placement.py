"""Which device a rank trains on, and a check that no two ranks of a node land on one GPU unasked.

Launchers differ in what a rank sees. torchrun, mpirun and a node-wide ``srun`` show every GPU of
the node to every rank: local rank i takes GPU i. ``srun --gpus-per-task=1`` shows each task only
its own GPU, as index 0. ``cuda:(local rank % visible GPUs)`` is right under both. With more ranks
on a node than GPUs it wraps, and ranks would share a GPU: NCCL refuses that ("Duplicate GPU
detected") and where it runs it is slow, so it is a one-line error unless ``--share-gpu`` asks for it.
Ranks are told apart by the GPU's UUID, as CUDA_VISIBLE_DEVICES renumbers devices per process.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from dali_ba.device import default_device

if TYPE_CHECKING:
    import torch


class GpuPlacement(NamedTuple):
    """Where one rank trains: what every rank reports for the sharing check and environment.json."""

    host: str
    gpu_index: int | None  # CUDA index in this process (None: CPU)
    gpu_uuid: str | None  # the physical GPU as nvidia-smi -L names it, whatever its index here
    visible_gpus: int | None  # GPUs this process sees (None: CPU)


def training_device(local_rank: int) -> torch.device:
    """``cuda:(local_rank % visible GPUs)``, or the CPU where no GPU is visible (see the module)."""
    import torch

    if not torch.cuda.is_available():
        return default_device()
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def gpu_placement(device: torch.device) -> GpuPlacement:
    """This process's placement when it trains on ``device``."""
    import torch

    host = socket.gethostname()
    if device.type != "cuda":
        return GpuPlacement(host, None, None, None)
    index = torch.cuda.current_device() if device.index is None else device.index
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)  # None: unknown, never reported shared
    return GpuPlacement(host, index, None if uuid is None else f"GPU-{uuid}", torch.cuda.device_count())


def gpu_sharing_error(placements: Sequence[GpuPlacement], share_gpu: bool) -> str | None:
    """The one-line error for the first GPU that several ranks of one host would use (``placements``
    in rank order), or None: no GPU is shared, or ``share_gpu`` allows it."""
    if share_gpu:
        return None
    users: dict[tuple[str, str], list[int]] = {}
    for rank, place in enumerate(placements):
        if place.gpu_uuid is not None:
            users.setdefault((place.host, place.gpu_uuid), []).append(rank)
    for (host, uuid), ranks in users.items():
        if len(ranks) > 1:
            counts = sorted({placements[rank].visible_gpus for rank in ranks})  # type: ignore[type-var]  # a rank with a GPU sees GPUs: never None here
            first = placements[ranks[0]]
            return (
                f"ranks {_listed(ranks)} on host {host} would share one GPU (cuda:{first.gpu_index}, {uuid}); "
                f"they see {_listed(counts, 'or')} GPU{'' if counts == [1] else 's'}: start at most {counts[0]} "
                f"rank{'' if counts[0] == 1 else 's'} per node, give each task its own GPU "
                "(srun --gpus-per-task=1), or pass --share-gpu to let them share it (slow)"
            )
    return None


def _listed(items: Sequence[object], last: str = "and") -> str:
    """'0', '0 and 1', '0, 1 and 2'."""
    words = [str(item) for item in items]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"
