"""Every rank's step times, gathered: rank 0 gathers the step clock's rows every few steps and writes
one record per step with the mean, std, min and max over ranks and the slowest rank, then the
end-of-run summary and its table. The same gather gives every rank each step's mean loss over ranks,
so all ranks see a diverged step alike (:func:`first_divergence`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dali_ba.training.step_clock import COLUMNS, StepRow

if TYPE_CHECKING:
    from dali_ba.distributed.world import World


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
    _rows: list[tuple[StepRow | Sequence[float], Any]] = field(default_factory=list)  # (clock row, loss)
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

        on_device = [
            (meta, key) for meta in self._meta for key, value in meta.items() if isinstance(value, torch.Tensor)
        ]
        values = _floats([loss for _, loss in self._rows] + [meta[key] for meta, key in on_device])
        losses = values[: len(self._rows)]
        for (meta, key), value in zip(on_device, values[len(self._rows) :]):
            meta[key] = value
        rows = [
            [*(row.seconds() if isinstance(row, StepRow) else row), loss] for (row, _), loss in zip(self._rows, losses)
        ]
        gathered = np.asarray(self.world.gather(rows))  # (ranks, steps, columns + loss)
        metas, self._rows, self._meta = self._meta, [], []
        if self.max_loss is not None and self.diverged is None:  # every rank holds every loss: all decide alike
            self.diverged = first_divergence(gathered[:, :, -1].mean(axis=0), metas, self.max_loss)
        if not self.world.is_root:
            return []
        records = []
        for i, info in enumerate(metas):
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
            name: {
                "mean": float(steps[:, :, c].mean()),
                "std": float(steps[:, :, c].mean(axis=1).std()),
                "min_rank": float(per_rank[:, c].min()),
                "max_rank": float(per_rank[:, c].max()),
                "slowest_rank": int(per_rank[:, c].argmax()),
            }
            for c, name in enumerate(COLUMNS)
        }
        return {
            "steady_steps": len(steps),
            "steps_per_s": float(rate.mean()),
            "steps_per_s_std": float(rate.std()),
            "images_per_s": float(rate.mean() * batch_size),
            "images_per_s_std": float(rate.std() * batch_size),
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
    lines = [
        f"timing over {summary['steady_steps']} steady-state steps x {ranks} rank(s), ms per step:",
        f"  {'phase':<17}{'mean':>9}{'std':>9}{'rank min':>10}{'rank max':>10}{'share':>8}  slowest rank",
    ]
    for name in COLUMNS:
        t = timing[name]
        share = 100 * t["mean"] / step_mean if step_mean else math.nan
        lines.append(
            f"  {name:<17}{1e3 * t['mean']:9.2f}{1e3 * t['std']:9.2f}{1e3 * t['min_rank']:10.2f}"
            f"{1e3 * t['max_rank']:10.2f}{share:7.1f}%  {t['slowest_rank']}"
        )
    lines.append(
        f"  {summary['steps_per_s']:.2f} ± {summary['steps_per_s_std']:.2f} steps/s, "
        f"{summary['images_per_s']:.0f} ± {summary['images_per_s_std']:.0f} unique img/s, "
        f"{summary['views_per_s']:.0f} ± {summary['views_per_s_std']:.0f} augmented img/s"
    )
    return "\n".join(lines)
