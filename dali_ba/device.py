"""The device this process computes on, as every stage sees it: where tensors go without a GPU
(the CPU, or the strict device mode's stand-in), a copy there that does not wait, and timestamps on
its stream that cost no synchronisation. Which GPU a rank takes is :mod:`dali_ba.distributed.placement`'s.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def default_device() -> torch.device:
    """Where tensors go without a GPU: the CPU, or under the strict device mode
    (:mod:`dali_ba.strict_device`) the stand-in device that keeps the GPU's contract."""
    import torch

    from dali_ba import strict_device

    return strict_device.enable() if strict_device.enabled() else torch.device("cpu")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without a wait: host memory is pinned first for a GPU (a copy from
    pageable memory is not asynchronous), then copied with ``non_blocking``."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def timestamp(device: torch.device):
    """A point in time that costs no synchronisation: a CUDA event recorded on torch's current
    stream (it completes when the stream reaches it), or ``perf_counter()`` on the CPU."""
    import torch

    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def seconds_between(start, end) -> float:
    """Seconds from one :func:`timestamp` to a later one (waits for CUDA events to complete)."""
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3
