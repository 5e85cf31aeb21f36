"""The state a checkpoint holds, built from a running rank and put back into one.

:func:`run_identity` is what a checkpoint must agree on to be resumed; :func:`checkpoint_state` is
what rank 0 saves: the model, optimizer, LR-schedule and AMP-scaler state, the RNG, the step, epoch
and training time, the broken files, and, when a run stops mid-epoch, every rank's loader position,
epoch sums and BatchNorm statistics (:func:`gather_rank_states`); :func:`restore_state` loads one
into this rank and says where its training restarts (a :class:`Start`).

Beside :mod:`dali_ba.training.checkpoint`, which writes, reads and checks the files and knows
nothing of the trainer's pieces; the trainer decides when.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dali_ba.recipe import Recipe

if TYPE_CHECKING:
    import torch

    from dali_ba.data.dataset import ImageDataset
    from dali_ba.distributed.world import World
    from dali_ba.training.rank_setup import Training


def data_identity(datasets: Sequence[ImageDataset]) -> dict[str, dict[str, Any]]:
    """Per split ("train", "val"): the data set's source, sample count and index fingerprint (paths
    relative to its root, labels: the same data mounted elsewhere keeps it)."""
    return {
        split: {"source": data.source, "samples": len(data), "sha256": data.fingerprint()}
        for split, data in zip(("train", "val"), datasets)
    }


def run_identity(recipe: Recipe, world: World, steps_per_epoch: int, datasets: Sequence[ImageDataset] = ()) -> dict:
    """What a checkpoint must agree on to be resumed by this run (with ``datasets``, the training and
    validation data's identity: :func:`data_identity`)."""
    d, m, o, r = recipe.data, recipe.model, recipe.optim, recipe.run
    identity = {
        "ranks": world.size,
        "arch": m.arch,
        "batch_size": d.batch_size,
        "views": d.views,
        "view_size": d.view_size,
        "augment": d.augment,
        "seed": r.seed,
        "regime": o.regime,
        "steps_per_epoch": steps_per_epoch,
    }
    if d.augment == "randaugment":  # only then: checkpoints of the other augmentations lack these keys
        identity.update(randaugment_n=d.randaugment_n, randaugment_m=d.randaugment_m)
    if datasets:
        identity["data"] = data_identity(datasets)
    return identity


@dataclass
class Start:
    """Where this rank's training (re)starts: an epoch, and when a checkpoint stopped mid-epoch, this
    rank's loader position in it and its epoch sums so far (loss over steps, right views, views)."""

    epoch: int = 0
    loader_state: dict | None = None
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])


def gather_rank_states(world: World, training: Training, sums: list[float] | None) -> tuple:
    """Collective. ``sums`` given: stopped mid-epoch, so every rank's loader position, epoch sums and
    BatchNorm statistics, gathered (loaders, sums, buffers); else three Nones."""
    mid_epoch = sums is not None
    loaders = world.gather(training.loader.state()) if mid_epoch else None
    all_sums = world.gather(sums) if mid_epoch else None
    # BatchNorm running statistics differ by rank until the epoch-end average: keep each rank's.
    buffers = world.gather({k: v.cpu() for k, v in training.model.named_buffers()}) if mid_epoch else None
    return loaders, all_sums, buffers


def checkpoint_state(
    identity: dict,
    step: int,
    epoch: int,
    train_time: float,
    training: Training,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    rank_states: tuple,
    broken: list[list[str]],
) -> dict:
    """What rank 0 saves after ``step``: ``rank_states`` from :func:`gather_rank_states`, ``broken``
    the run's broken files."""
    import torch

    t = training
    loaders, all_sums, buffers = rank_states
    return {
        "run": identity,
        "step": step,
        "epoch": epoch,
        "train_time": train_time,
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler else None,
        "rng": torch.get_rng_state(),
        "loaders": loaders,
        "epoch_sums": all_sums,
        "rank_buffers": buffers,
        "bad_files": broken,
    }


def restore_state(
    state: dict,
    training: Training,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
    bad_files: dict[str, str],
) -> Start:
    """Load a checkpoint's ``state`` into this rank (model, optimizer, LR schedule, AMP scaler, RNG, the
    broken files into ``bad_files``); return where its training restarts. The step and the training
    time so far are the caller's to take (``state["step"]``, ``state["train_time"]``)."""
    import torch

    t = training
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if t.scaler and state["scaler"]:
        t.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    bad_files.update(dict(state["bad_files"]))  # skipped before the stop: skipped the same way now
    if not state["loaders"]:
        return Start(state["epoch"])
    # Stopped mid-epoch: each rank carries on from its own loader position, sums and BatchNorm statistics.
    t.model.load_state_dict(state["rank_buffers"][rank], strict=False)
    return Start(state["epoch"], state["loaders"][rank], state["epoch_sums"][rank])
