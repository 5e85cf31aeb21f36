"""Joining the ranks: :func:`init_world` builds the :class:`~dali_ba.distributed.world.World` of
the engine the launcher calls for.

A module of its own because it names every engine: the engines import the base world, so the one
function that picks among them cannot live beside it without an import circle.
"""

from __future__ import annotations

from dali_ba.distributed.horovod_engine import HorovodWorld
from dali_ba.distributed.launcher import EngineChoice, choose_engine
from dali_ba.distributed.placement import training_device
from dali_ba.distributed.torch_engine import TorchWorld
from dali_ba.distributed.world import World


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
