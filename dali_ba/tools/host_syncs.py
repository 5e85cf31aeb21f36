"""Host syncs counted on CUDA, per training step, with where they come from.

The trainer promises no wait for the GPU inside a step. The strict device mode checks that promise
on the CPU, but it cannot see a sync inside ATen or a C++ extension. On CUDA, torch can: in its
sync debug mode ``"warn"`` every synchronizing CUDA call warns, attributed to the Python line that
made it. The step profiler turns that mode on for its loader-fed steps after the warm-up, and this
module counts the warnings per step and by call site. On the CPU the counter is off: nothing
is counted.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["SYNC_WARNING", "SyncCounter"]

SYNC_WARNING = "called a synchronizing CUDA operation"  # the text of torch's sync debug warning


@dataclass
class SyncCounter:
    """Counts the sync warnings of each step (:meth:`step`) on ``device`` when it is CUDA."""

    device: torch.device
    per_step: list[int] = field(default_factory=list)
    sites: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def enabled(self) -> bool:
        return self.device.type == "cuda"

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Count the sync warnings raised inside this block as one step's (a no-op off CUDA)."""
        if not self.enabled:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every sync, not one per call site
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
        self.per_step.append(len(syncs))
        self.sites.update(f"{w.filename}:{w.lineno}" for w in syncs)
        for other in caught:  # any other warning goes on as it would have
            if SYNC_WARNING not in str(other.message):
                warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)

    def report(self) -> dict:
        """What the profile records: counted or not, syncs per step, and the call sites by count."""
        if not self.enabled:
            return {"counted": False, "why": f"torch's sync debug mode is CUDA's; the device is {self.device.type}"}
        return {
            "counted": True,
            "per_step": self.per_step,
            "steps": len(self.per_step),
            "total": sum(self.per_step),
            "max_per_step": max(self.per_step, default=0),
            "sites": dict(self.sites.most_common()),
        }
