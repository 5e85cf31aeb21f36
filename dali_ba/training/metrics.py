"""Where each step's time goes, on every rank: phase clocks, cross-rank statistics, the metrics file.

A step is timed as consecutive phases on each rank -- waiting for the loader (``data``), moving the
batch to the device (``h2d``), forward + backward (``forward_backward``) and the wait for the gradient
allreduce + the optimizer step (``allreduce_step``: Horovod's wait in its optimizer, or DDP's wait at
the end of backward, moved here from forward_backward) -- so the phases add up to the step. On a GPU
torch's stream is synchronised before each clock reading and every phase is an NVTX range (``nsys`` shows
them). Ranks keep their own rows; rank 0 gathers them every few steps and writes one record
per step with the mean, std, min and max over ranks and the slowest rank.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dali_ba.activity import ACTIVITY
from dali_ba.device import seconds_between, timestamp

if TYPE_CHECKING:
    import torch

    from dali_ba.distributed.world import World

PHASES = ("data", "h2d", "forward_backward", "allreduce_step")
COLUMNS = (*PHASES, "step")  # what one rank records per step, in seconds


def emit(line: str, stream=None) -> None:
    """Write a whole line in one call: launchers (mpirun --tag-output) tag each write separately."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


class MetricsLog:
    """JSON lines on rank 0 (one object per record, flushed at once); a no-op elsewhere. With
    ``tensorboard`` (a folder) the step and epoch records also go there as TensorBoard scalars."""

    def __init__(self, path: Path | None, append: bool = False, tensorboard: Path | None = None):
        self._path, self._tensorboard = path, tensorboard
        if path is not None and append:
            _drop_partial_line(path)  # a run that stopped on a full disk may have left half a record
        self._file = open(path, "a" if append else "w") if path is not None else None
        self._scalars = TensorBoardScalars(tensorboard) if path is not None and tensorboard is not None else None

    def write(self, kind: str, **fields) -> None:
        """One record (a full disk: :class:`dali_ba.training.output.OutputFullError` naming the file)."""
        from dali_ba.training.output import writing

        if self._file:
            with writing(self._path, self._path.parent):
                self._file.write(json.dumps({"kind": kind, **fields}) + "\n")
                self._file.flush()
        if self._scalars:
            with writing(self._tensorboard, self._path.parent):
                self._scalars.add(kind, fields)

    def close(self) -> None:
        from dali_ba.training.output import writing

        if self._file:
            self._file.close()
        if self._scalars:
            with writing(self._tensorboard, self._path.parent):
                self._scalars.close()


def _drop_partial_line(path: Path) -> None:
    """Cut ``path`` back to its last complete line (a record cut short by a full disk)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as file:
            file.truncate(data.rfind(b"\n") + 1)


class TensorBoardScalars:
    """Step records as scalars over the global step (train/loss, train/lr, train/grad_norm,
    train/steps_per_s, time/<phase>_ms: the mean over ranks), epoch records over the epoch
    (epoch/<field>: losses, accuracies, throughput, broken files); torch's SummaryWriter."""

    STEP_FIELDS = ("loss", "lr", "grad_norm")
    EPOCH_FIELDS = ("train_loss", "train_top1", "val_loss", "top1", "top5", "views_top1", "views_top5",
                    "calibrated_top1", "calibrated_top5", "steps_per_s", "images_per_s", "views_per_s", "bad_files")

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(folder))

    def add(self, kind: str, fields: dict) -> None:
        add = self._writer.add_scalar
        if kind == "step":
            step = fields["step"]
            for name in self.STEP_FIELDS:
                if name in fields:
                    add(f"train/{name}", fields[name], step)
            for phase, stats in fields["time"].items():
                add(f"time/{phase}_ms", 1e3 * stats["mean"], step)
            if fields["time"]["step"]["mean"] > 0:
                add("train/steps_per_s", 1.0 / fields["time"]["step"]["mean"], step)
        elif kind == "epoch":
            for name in self.EPOCH_FIELDS:
                if name in fields:
                    add(f"epoch/{name}", fields[name], fields["epoch"] + 1)
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def stream_sync(device: torch.device) -> Callable[[], None]:
    """Wait for torch's own CUDA stream only (a no-op on CPU): a device-wide sync would also wait for
    DALI's prefetching of the next batches and charge it to the step."""
    import torch

    from dali_ba import strict_device

    if device.type != "cuda":
        return (lambda: strict_device.record("the step clock's stream sync")) if strict_device.is_device(device) else (lambda: None)
    return lambda: torch.cuda.current_stream(device).synchronize()


@dataclass
class StepRow:
    """One step's timestamps, read later (:meth:`seconds`): consecutive marks (phase name, stamp)
    from the step's start, and the spans to charge to another phase (DDP's wait inside backward)."""

    marks: list[tuple[str | None, object]]
    moves: list[tuple[str, str, object, object]]

    def seconds(self) -> list[float]:
        """The phase times and the whole step (first mark to last), seconds: the phases add up to it."""
        times = dict.fromkeys(PHASES, 0.0)
        for (_, start), (name, end) in zip(self.marks, self.marks[1:]):
            times[name] += seconds_between(start, end)
        for source, target, start, end in self.moves:
            moved = min(max(seconds_between(start, end), 0.0), times[source])
            times[source] -= moved
            times[target] += moved
        return [times[p] for p in PHASES] + [seconds_between(self.marks[0][1], self.marks[-1][1])]


class StepClock:
    """Times the phases of one step on this rank; ``phase(name)`` is a context manager.

    Phases are back to back: each runs from the end of the one before (or the step's start), so the
    little Python between them (or a moment the process was descheduled there) is charged to the next
    phase and the phases add up to the step exactly. On a GPU the marks are CUDA events on torch's
    stream: nothing waits for the GPU during a step, and a step's times are read (one wait) only
    when its row is, every ``--log-every`` steps. A phase's time is then when the stream finished
    its work, or, when the stream had run dry (waiting for data), when the host queued the next.
    """

    def __init__(self, device: torch.device):
        import torch

        from dali_ba import strict_device

        self._device = device
        self._sync = stream_sync(device)
        self._mark_step = strict_device.mark_step
        self._nvtx = torch.cuda.nvtx if device.type == "cuda" else None
        self._row = StepRow([], [])

    def sync(self) -> None:
        """Wait for the device's queued work (a no-op on CPU)."""
        self._sync()

    def begin(self) -> None:
        self._mark_step()  # under the strict device mode, the syncs from here on are this step's
        self._row = StepRow([(None, timestamp(self._device))], [])

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        ACTIVITY.set_phase(name)  # what the stall watch names when a step never ends
        if self._nvtx:
            self._nvtx.range_push(name)
        try:
            yield
        finally:
            self._row.marks.append((name, timestamp(self._device)))  # GPU work queued in this phase is charged to it
            if self._nvtx:
                self._nvtx.range_pop()

    def move(self, source: str, target: str, span: tuple | None) -> None:
        """Charge the ``span`` (two timestamps) of phase ``source`` to ``target`` instead (at most
        all of ``source``); None: nothing to move."""
        if span is not None:
            self._row.moves.append((source, target, *span))

    def end(self) -> StepRow:
        """This step's row, to be read (``row.seconds()``) when it is logged."""
        return self._row


def _floats(values: list) -> list[float]:
    """Floats or 0-d tensors (all on one device) as floats: one copy from the device for all the tensors."""
    import torch

    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).cpu().tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


def first_divergence(losses: np.ndarray, meta: Sequence[dict], max_loss: float) -> dict | None:
    """The first step whose mean loss over ranks is not finite or above ``max_loss`` (0: only non-finite
    losses), as its meta (step, lr, ...) with its loss; None when every loss is fine. Under fp16 AMP a
    step that loss scaling skipped (inf gradients) has a finite loss: not a divergence."""
    for loss, info in zip(losses.tolist(), meta):
        if not math.isfinite(loss) or (max_loss and loss > max_loss):
            return {**info, "loss": loss}
    return None


def phase_stats(per_rank: np.ndarray) -> dict[str, float | int]:
    """Statistics over ranks of one time (1-D, seconds per rank), to the microsecond: a step record
    stays small enough for millions of steps."""
    stats = {"mean": per_rank.mean(), "std": per_rank.std(), "min": per_rank.min(), "max": per_rank.max()}
    return {**{k: round(float(v), 6) for k, v in stats.items()}, "slowest_rank": int(per_rank.argmax())}


@dataclass
class StepTimes:
    """Every rank's step rows, buffered and gathered to rank 0 every ``flush()``.

    Rows are (phase times..., step time, loss). Rank 0 turns each gathered step into a metrics
    record, and keeps the steady-state steps (those after ``warmup`` steps of their epoch) for the
    end-of-run summary.
    """

    world: World
    warmup: int
    _rows: list[list[float]] = field(default_factory=list)
    _meta: list[dict] = field(default_factory=list)
    steady: list[np.ndarray] = field(default_factory=list)  # rank 0: (ranks, columns) per steady step
    max_loss: float | None = None  # a mean loss not finite or above it is a divergence; None: not watched
    diverged: dict | None = None  # the first diverged step's meta and loss, once one is seen (every rank)

    def add(self, row: StepRow | Sequence[float], loss, step_in_epoch: int, **meta) -> None:
        """Buffer a step: its clock row and loss (a float, or a tensor still on the device) are read
        at the next :meth:`flush`, so that a step never waits for the GPU."""
        self._rows.append((row, loss))
        self._meta.append({"step_in_epoch": step_in_epoch, **meta})

    def flush(self) -> list[dict]:
        """Gather the buffered rows; on rank 0 return one record per step (elsewhere an empty list)."""
        if not self._rows:
            return []
        # The losses and any other value still on the device (--log-grad-norm's): one copy for all of them.
        import torch

        on_device = [(meta, key) for meta in self._meta for key, value in meta.items() if isinstance(value, torch.Tensor)]
        values = _floats([loss for _, loss in self._rows] + [meta[key] for meta, key in on_device])
        losses = values[: len(self._rows)]
        for (meta, key), value in zip(on_device, values[len(self._rows):]):
            meta[key] = value
        rows = [[*(row.seconds() if isinstance(row, StepRow) else row), loss] for (row, _), loss in zip(self._rows, losses)]
        gathered = np.asarray(self.world.gather(rows))  # (ranks, steps, columns + loss)
        meta, self._rows, self._meta = self._meta, [], []
        if self.max_loss is not None and self.diverged is None:  # every rank holds every loss: all decide alike
            self.diverged = first_divergence(gathered[:, :, -1].mean(axis=0), meta, self.max_loss)
        if not self.world.is_root:
            return []
        records = []
        for i, info in enumerate(meta):
            table = gathered[:, i, :]
            step_in_epoch = info.pop("step_in_epoch")
            if step_in_epoch >= self.warmup:
                self.steady.append(table[:, : len(COLUMNS)])
            timing = {name: phase_stats(table[:, c]) for c, name in enumerate(COLUMNS)}
            records.append({**info, "loss": float(table[:, -1].mean()), "time": timing})
        return records

    def summary(self, batch_size: int, views: int) -> dict:
        """Steady-state throughput (mean and std over steps, like the paper's Figure 5) and phase times."""
        if not self.steady:
            return {"steady_steps": 0}
        steps = np.stack(self.steady)  # (steps, ranks, columns)
        step_time = steps[:, :, -1].mean(axis=1)  # a step's time: the mean over ranks
        rate = 1.0 / step_time
        per_rank = steps.mean(axis=0)  # (ranks, columns): each rank's mean phase times
        timing = {
            name: {"mean": float(steps[:, :, c].mean()), "std": float(steps[:, :, c].mean(axis=1).std()),
                   "min_rank": float(per_rank[:, c].min()), "max_rank": float(per_rank[:, c].max()),
                   "slowest_rank": int(per_rank[:, c].argmax())}
            for c, name in enumerate(COLUMNS)
        }
        return {
            "steady_steps": len(steps),
            "steps_per_s": float(rate.mean()), "steps_per_s_std": float(rate.std()),
            "images_per_s": float(rate.mean() * batch_size), "images_per_s_std": float(rate.std() * batch_size),
            "views_per_s": float(rate.mean() * batch_size * views),
            "views_per_s_std": float(rate.std() * batch_size * views),
            "timing": timing,
        }


def summary_table(summary: dict, ranks: int) -> str:
    """The end-of-run table: per phase, mean over steady steps and ranks, spread, share of the step."""
    if not summary.get("steady_steps"):
        return "timing: no steady-state steps (every step was a warm-up step; lower --timing-warmup)"
    timing = summary["timing"]
    step_mean = timing["step"]["mean"]
    lines = [f"timing over {summary['steady_steps']} steady-state steps x {ranks} rank(s), ms per step:",
             f"  {'phase':<17}{'mean':>9}{'std':>9}{'rank min':>10}{'rank max':>10}{'share':>8}  slowest rank"]
    for name in COLUMNS:
        t = timing[name]
        share = 100 * t["mean"] / step_mean if step_mean else math.nan
        lines.append(f"  {name:<17}{1e3 * t['mean']:9.2f}{1e3 * t['std']:9.2f}{1e3 * t['min_rank']:10.2f}"
                     f"{1e3 * t['max_rank']:10.2f}{share:7.1f}%  {t['slowest_rank']}")
    lines.append(f"  {summary['steps_per_s']:.2f} ± {summary['steps_per_s_std']:.2f} steps/s, "
                 f"{summary['images_per_s']:.0f} ± {summary['images_per_s_std']:.0f} unique img/s, "
                 f"{summary['views_per_s']:.0f} ± {summary['views_per_s_std']:.0f} augmented img/s")
    return "\n".join(lines)


class Progress:
    """Rank 0's view of training: a tqdm bar on a terminal, plain lines (every ``every`` steps) otherwise
    -- SLURM logs and launchers that pipe output get lines, not carriage returns."""

    def __init__(self, total: int, initial: int, every: int, enabled: bool, stream=None):
        self._stream = stream or sys.stderr
        self._every, self._total, self._enabled = every, total, enabled
        self._bar = None
        self._last = (initial, time.perf_counter())
        if enabled and self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", file=self._stream, dynamic_ncols=True)

    def update(self, step: int, epoch: int, loss: float, lr: float) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}", lr=f"{lr:.4g}", refresh=False)
            return
        if step % self._every and step != self._total:
            return
        last_step, last_time = self._last
        now = time.perf_counter()
        rate = (step - last_step) / (now - last_time) if now > last_time else 0.0
        self._last = (step, now)
        emit(f"step {step}/{self._total}  epoch {epoch + 1}  loss {loss:.4f}  lr {lr:.4g}  {rate:.2f} steps/s",
             sys.stdout)

    def write(self, line: str) -> None:
        """A line that doesn't tear the bar."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            emit(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
