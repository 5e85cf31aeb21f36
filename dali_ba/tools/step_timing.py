"""Training steps timed as the trainer runs them: N steps between two synchronisations of the device.

What ``dali_ba.tools.profile step`` and ``profile views`` measure (:func:`measure_step`): the loader alone,
training steps fed by it, and the same steps from batches cached in memory, each a window of N steps
with no wait for the device inside, so that the loader's next batch overlaps a step's compute as in
training and the data stall is the one training sees. In :mod:`dali_ba.tools`, beside the profiler:
nothing else uses it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dali_ba.device import to_device
from dali_ba.recipe import Recipe
from dali_ba.tools.host_syncs import SyncCounter
from dali_ba.training.step_clock import PHASES, StepClock, StepRow

YIELD_VARIABLE = "OMPI_MCA_mpi_yield_when_idle"
TIMING_RULE = (
    "--warmup untimed steps, one synchronisation, --steps N steps with no wait for the device inside "
    "(as dali_ba.train runs them), one synchronisation: step_time = the seconds between the two "
    "synchronisations / N (mean over ranks); phases, data_wait and the spread over steps from the step "
    "clock's rows (CUDA events on a GPU, perf_counter on the CPU), read after the second"
)


def endless(loader) -> Iterator:
    """Batches of a BatchAugmentLoader, epoch after epoch (each epoch builds its pipeline, as in training)."""
    for epoch in itertools.count():
        yield from loader.epoch(epoch)


@dataclass
class Window:
    """Steps timed between two synchronisations: the seconds between them, and each step's clock row
    (the phases' seconds, then the step's: :meth:`dali_ba.training.step_clock.StepRow.seconds`)."""

    seconds: float
    rows: list[list[float]]


def clocked_step(batches: Iterator, work: Callable | None, clock: StepClock) -> StepRow:
    """One step as dali_ba.train runs it, marked on ``clock`` and waiting for nothing on the device:
    the next batch (the ``data`` phase), then ``work(images, labels)``, which marks its own phases."""
    clock.begin()
    with clock.phase("data"):
        images, labels = next(batches)
    if work is not None:
        work(images, labels)
    return clock.end()


def time_window(
    batches: Iterator,
    warmup: int,
    steps: int,
    work: Callable | None,
    clock: StepClock,
    syncs: SyncCounter | None = None,
) -> Window:
    """``warmup`` untimed steps, then ``steps`` steps between two synchronisations (:data:`TIMING_RULE`).
    The trainer never waits for the GPU inside a step: a wait after each would time a serialised loop,
    in which the loader's next batch cannot overlap this step's compute, and so not the data stall that
    training sees. The warm-up adds no synchronisation (the first one also waits for its queued work);
    the rows are read after the second (reading a CUDA event waits for it). ``syncs`` counts the timed
    steps' host syncs (on CUDA)."""
    for _ in range(warmup):
        clocked_step(batches, work, clock)
    clock.sync()
    start = time.perf_counter()
    rows = []
    for _ in range(steps):
        with syncs.step() if syncs is not None else contextlib.nullcontext():
            rows.append(clocked_step(batches, work, clock))
    clock.sync()
    seconds = time.perf_counter() - start
    return Window(seconds, [row.seconds() for row in rows])


def write_json(path: Path, data: dict) -> None:
    """Written beside, then renamed over ``path``: a process killed while writing (a time limit) leaves
    the previous whole file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".partial")
    part.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(part, path)


def window_stats(world, window: Window, batch_size: int, views: int) -> dict:
    """Statistics of one timed window over all ranks. The step time is each rank's seconds between the
    synchronisations / steps (the mean over ranks; the slowest rank's too); the phases (``data`` is the
    wait for the batch), the spread and median over steps come from the clock rows of every rank."""
    gathered = world.gather((window.seconds, window.rows))
    seconds = np.array([seconds for seconds, _ in gathered])  # (ranks,)
    rows = np.array([rows for _, rows in gathered])  # (ranks, steps, phases + step)
    per_rank = seconds / rows.shape[1]
    totals, waits, means = rows[..., -1], rows[..., 0], rows.mean(axis=(0, 1))
    step_time = float(per_rank.mean())
    steps_per_s = 1 / step_time
    return dict(
        step_time=step_time,
        step_time_std=float(totals.std()),
        step_time_median=float(np.median(totals)),
        slowest_rank_step_time=float(per_rank.max()),
        data_wait=float(means[0]),
        steps_per_s=steps_per_s,
        images_per_s=steps_per_s * batch_size,
        views_per_s=steps_per_s * batch_size * views,
        window_seconds=seconds.tolist(),
        step_times=totals.tolist(),
        data_waits=waits.tolist(),
        phases={name: float(v) for name, v in zip(PHASES, means)},
    )


def load_step_data(recipe: Recipe, world):
    """Collective: the training set of a step profile, listed by rank 0 alone and sent to the others (one
    listing per job, as dali_ba.train does)."""
    from dali_ba.data.dataset import load_dataset
    from dali_ba.training.shared_index import listed_once

    return listed_once(world, lambda: load_dataset(recipe.data.train))


def measure_step(
    world,
    recipe: Recipe,
    train_set,
    steps: int,
    warmup: int,
    cache: int,
    progress: Callable[[dict], None] | None = None,
) -> dict | None:
    """Time the loader alone, then training steps fed by the loader, then from cached batches, on an
    open world (so that a sweep joins the ranks once). Rank 0 gets the statistics over all ranks, the others None.
    After each of the three windows rank 0 hands ``progress`` what is measured so far (``complete``
    False, ``windows`` the finished ones): a run killed at a time limit still leaves its finished windows."""
    from dali_ba.training.rank_setup import setup_training

    d, m = recipe.data, recipe.model
    training = setup_training(recipe, world, train_set)  # exactly as dali_ba.train sets up a rank
    world.broadcast_from_root(training.model, training.optimizer)
    device, loader, torch_threads, cores = (
        training.device,
        training.loader,
        training.torch_threads,
        len(os.sched_getaffinity(0)),
    )
    training.model.train()
    clock = StepClock(device)

    def work(images, labels) -> None:
        """The rest of a training step on a batch, as dali_ba.train runs it: h2d, then the step's phases."""
        with clock.phase("h2d"):
            images, labels = to_device(images, device), to_device(labels, device)
        training.step(images, labels, clock)

    count = warmup + steps
    batches = endless(loader)
    cached = [(images.clone(), labels.clone()) for images, labels in itertools.islice(batches, min(cache, steps))]
    nodes = sorted(set(world.gather(socket.gethostname())))  # collective, like each window's statistics below
    threads = (d.dali_threads + torch_threads) * world.local_size
    setting = dict(
        kind="profile_step",
        complete=False,
        windows=[],
        train=d.train,
        engine=world.engine,
        engine_backend=world.backend,
        ranks=world.size,
        local_ranks=world.local_size,
        nodes=nodes,
        views=d.views,
        batch_size=d.batch_size,
        per_rank_batch=training.per_rank,
        view_size=d.view_size,
        arch=m.arch,
        amp=m.amp,
        chunks=recipe.optim.chunks,
        device=device.type,
        decoder=loader.decoder,
        dali_threads=d.dali_threads,
        torch_threads=torch_threads,
        cores=cores,
        oversubscribed=threads > cores,
        mpi_yield_when_idle=os.environ.get(YIELD_VARIABLE),
        steps=steps,
        warmup=warmup,
        timing=TIMING_RULE,
        cached_batches=len(cached),
        steps_per_epoch=len(loader),
    )
    # Loader-fed steps before memory-fed ones: what warm-up is left after `warmup` steps counts against the loader.
    # Each window's statistics are gathered right after it (outside its two synchronisations), in the same
    # order on every rank, so that rank 0 can save the finished windows before the next one starts.
    # The loader-fed steps (training as it runs) also count their host syncs, on CUDA.
    stats: dict[str, dict] = {}
    syncs = SyncCounter(device)
    for name, source, step_work, counter in (
        ("pipeline", batches, None, None),
        ("loader", batches, work, syncs),
        ("memory", itertools.cycle(cached), work, None),
    ):
        before = loader.source_time()
        window = time_window(source, warmup, steps, step_work, clock, counter)
        stats[name] = window_stats(world, window, d.batch_size, d.views)
        if counter is not None:
            setting.update(host_syncs(world.gather(counter.report())))
            setting.update(source_callback(world.gather(np.subtract(loader.source_time(), before).tolist())))
        if progress is not None and world.is_root and len(stats) < 3:
            progress(_partial_step(setting, stats))
    if not world.is_root:
        return None
    pipeline, memory, fed = stats["pipeline"], stats["memory"], stats["loader"]
    stall = (fed["step_time"] - memory["step_time"]) / fed["step_time"]
    # Which timed loader-fed steps began an epoch (the loader builds each epoch's pipeline when it starts).
    first = len(cached) + count + warmup  # position of the first of them in `batches`
    starts = np.arange(first, first + steps) % len(loader) == 0
    waits = np.array(fed["data_waits"])  # (ranks, steps): the share of all ranks' timed seconds waited there
    epoch_start_wait = waits[:, starts].sum() / (waits.size * fed["step_time"])
    return dict(
        _partial_step(setting, stats),
        complete=True,
        data_stall=min(1.0, max(0.0, stall)),
        data_stall_raw=stall,
        data_wait_share=fed["data_wait"] / fed["step_time"],
        epoch_starts=int(starts.sum()),
        epoch_start_wait_share=float(epoch_start_wait),
        data_stall_median=(fed["step_time_median"] - memory["step_time_median"]) / fed["step_time_median"],
        compute_per_loader_batch=memory["step_time"] / pipeline["step_time"],
    )


def host_syncs(reports: list[dict]) -> dict:
    """The ranks' sync counts as the profile records them: ``syncs_per_step`` the most any rank had in
    one timed loader-fed step (the target is 0), None where they were not counted (not CUDA)."""
    counted = all(report["counted"] for report in reports)
    return dict(
        syncs_per_step=max(report["max_per_step"] for report in reports) if counted else None,
        host_syncs=reports,
    )


def source_callback(spent: list[list[float]]) -> dict:
    """The training thread's time inside the loader's source per batch it handed over, during the
    loader-fed window (warm-up included), averaged over ranks: ``[seconds, batches]`` per rank. None
    where no batch came through a source in that window (cached batches, say)."""
    seconds, count = (sum(values) for values in zip(*spent))
    return dict(source_callback_time=seconds / count if count else None, source_callback_batches=int(count))


def _partial_step(setting: dict, stats: dict[str, dict]) -> dict:
    """The step profile as far as its finished windows go: the loader alone's batch times, and the loader-fed
    steps' rates once that window is done (what Figure 5 plots); the data stall needs all three."""
    out = dict(setting, windows=list(stats))
    if "loader" in stats:
        fed = stats["loader"]
        out.update(steps_per_s=fed["steps_per_s"], images_per_s=fed["images_per_s"], views_per_s=fed["views_per_s"])
    if "pipeline" in stats:
        pipeline = stats["pipeline"]
        out["pipeline"] = dict(
            batch_time=pipeline["step_time"],
            batch_time_std=pipeline["step_time_std"],
            samples_per_s=pipeline["images_per_s"],
            views_per_s=pipeline["views_per_s"],
            batch_times=pipeline["step_times"],
            window_seconds=pipeline["window_seconds"],
        )
    out.update({name: stats[name] for name in ("memory", "loader") if name in stats})
    return out
