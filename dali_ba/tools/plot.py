"""Figures of one or several training runs (e.g. an M sweep), from their metrics.jsonl.

    dali-ba plot runs/m1 runs/m4 runs/m8 [--out runs/figures]

Writes PNGs (default: into the first run folder):
- error_vs_epoch.png, error_vs_time.png: training (dashed) and validation (solid) error, as the
  paper's Figures 1, 3 and 5 (error = 100 - top-1 %);
- grad_norm.png: L2 norm of the allreduced gradient per step (Figure 2; runs trained with
  --log-grad-norm only), smoothed with ``--smooth BETA`` (an exponential moving average; the raw
  values stay as a faint line);
- steps_per_s.png: training steps per second of each run, mean and standard deviation.
Runs are named by M and B from their "start" record (or their recipe.toml).
"""

from __future__ import annotations

import json
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dali_ba.errors import OneLineParser, UsageError, finite_float

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PROG = "dali-ba plot"


def new_figure(width: float = 7.0, height: float = 4.5):
    """A (figure, axes) pair from matplotlib's file-only backend (no display needed on a cluster)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path


@dataclass
class Run:
    """One run folder's records, each kind in order; a resumed run's repeated records keep the last."""

    path: Path
    views: int | None = None
    batch_size: int | None = None
    regime: str = "ba"
    epochs: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    summary: dict | None = None
    label: str = ""

    @property
    def name_mb(self) -> str:
        views = "?" if self.views is None else self.views
        batch = "?" if self.batch_size is None else self.batch_size
        return f"M={views}, B={batch}" + (" (RA)" if self.regime == "ra" else "")


def _number(record: dict, key: str, where: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{where}: '{key}' must be a number, got {value!r}")
    return value


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a missing, empty or garbled file is a UsageError naming it."""
    if not path.is_file():
        raise UsageError(f"metrics file not found: {path}")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
            raise UsageError(f"{path}:{number}: not a metrics record (a JSON object with a 'kind')")
        records.append(record)
    if not records:
        raise UsageError(f"{path} is empty: no metrics records")
    return records


def load_run(folder: str | Path) -> Run:
    """A run folder: its metrics.jsonl, labelled with M and B from the start record or recipe.toml."""
    folder = Path(folder)
    path = folder / "metrics.jsonl"
    run = Run(folder)
    epochs: dict[int, dict] = {}
    steps: dict[int, dict] = {}
    for record in read_metrics(path):
        where = f"{path}: {record['kind']} record"
        if record["kind"] == "start":
            run.views, run.batch_size = record.get("views"), record.get("batch_size")
            run.regime = record.get("regime", "ba")
        elif record["kind"] == "epoch":
            _number(record, "top1", where)
            epochs[int(_number(record, "epoch", where))] = record
        elif record["kind"] == "step":
            steps[int(_number(record, "step", where))] = record
        elif record["kind"] == "summary":
            run.summary = record
    run.epochs = [epochs[k] for k in sorted(epochs)]
    run.steps = [steps[k] for k in sorted(steps)]
    if run.views is None or run.batch_size is None:
        recipe = folder / "recipe.toml"
        try:
            data = tomllib.loads(recipe.read_text()).get("data", {}) if recipe.is_file() else {}
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            raise UsageError(f"{recipe}: not valid TOML") from None
        run.views = run.views if run.views is not None else data.get("views")
        run.batch_size = run.batch_size if run.batch_size is not None else data.get("batch_size")
    return run


def label_runs(runs: list[Run]) -> None:
    """Legend names: M and B, plus the folder name where two runs would otherwise look the same."""
    names = [run.name_mb for run in runs]
    for run, name in zip(runs, names):
        run.label = name if names.count(name) == 1 else f"{name} ({run.path.name})"


def _wall(run: Run) -> list[float]:
    """Seconds since training start at each epoch's end: the 'wall' field, else summed epoch times."""
    if all("wall" in e for e in run.epochs):
        return [e["wall"] for e in run.epochs]
    total, walls = 0.0, []
    for e in run.epochs:
        total += e.get("epoch_time", 0.0)
        walls.append(total)
    return walls


def _time_unit(seconds: float) -> tuple[str, float]:
    for unit, size in (("h", 3600.0), ("min", 60.0)):
        if seconds >= 3 * size:
            return unit, size
    return "s", 1.0


def error_figure(runs: list[Run], x: str) -> Figure:
    """Training (dashed) and validation (solid) error, one colour per run, vs 'epoch' or 'time'."""
    fig, ax = new_figure()
    unit, size = _time_unit(max((max(_wall(r), default=0) for r in runs), default=0))
    for index, run in enumerate(runs):
        if not run.epochs:
            continue
        xs = [e["epoch"] + 1 for e in run.epochs] if x == "epoch" else [w / size for w in _wall(run)]
        colour = f"C{index % 10}"
        ax.plot(
            xs, [100 - e["top1"] for e in run.epochs], "-", color=colour, marker=".", label=f"{run.label} validation"
        )
        trained = [(xv, e["train_top1"]) for xv, e in zip(xs, run.epochs) if "train_top1" in e]
        if trained:
            ax.plot(*zip(*[(xv, 100 - t) for xv, t in trained]), "--", color=colour, label=f"{run.label} training")
    ax.set_xlabel("epoch" if x == "epoch" else f"wall-clock time ({unit})")
    ax.set_ylabel("error (%)")
    ax.set_title(f"Training (dashed) and validation (solid) error vs {'epoch' if x == 'epoch' else 'time'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def ema(values: list[float], beta: float) -> list[float]:
    """Exponential moving average, bias-corrected (Adam's way) so that it starts at the data:
    s_t = beta * s_{t-1} + (1 - beta) * x_t, reported as s_t / (1 - beta^t). beta = 0: the values."""
    out, state = [], 0.0
    for t, value in enumerate(values, 1):
        state = beta * state + (1 - beta) * value
        out.append(state / (1 - beta**t))
    return out


def grad_norm_figure(runs: list[Run], smooth: float = 0.0) -> Figure:
    fig, ax = new_figure()
    for index, run in enumerate(runs):
        points = [(s["step"], s["grad_norm"]) for s in run.steps if "grad_norm" in s]
        if not points:
            continue
        steps, norms = zip(*points)
        if smooth:
            ax.plot(steps, norms, color=f"C{index % 10}", alpha=0.2, linewidth=0.8)
        ax.plot(steps, ema(list(norms), smooth), color=f"C{index % 10}", label=run.label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient L2 norm (log scale)")
    ax.set_title("Norm of the allreduced gradient" + (f" (EMA, beta {smooth:g}; faint: raw)" if smooth else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return fig


def throughput(run: Run) -> tuple[float, float, float | None] | None:
    """(steps/s, its std, images/s): from the summary, else the mean and std over the epochs."""
    import numpy as np

    s = run.summary or {}
    rates = [e["steps_per_s"] for e in run.epochs if "steps_per_s" in e]
    images = [e["images_per_s"] for e in run.epochs if "images_per_s" in e]
    if "steps_per_s" in s:  # older summaries have no std: the spread over epochs stands in
        return s["steps_per_s"], s.get("steps_per_s_std", float(np.std(rates)) if rates else 0.0), s.get("images_per_s")
    if not rates:
        return None
    return float(np.mean(rates)), float(np.std(rates)), float(np.mean(images)) if images else None


def throughput_figure(runs: list[Run]) -> Figure:
    rows = [(run.label, *throughput(run)) for run in runs if throughput(run)]  # type: ignore[misc]  # the if drops the runs without one
    fig, ax = new_figure(max(5.0, 1.4 * len(rows) + 2))
    labels, rates, stds, images = zip(*rows)
    bars = ax.bar(
        range(len(rows)),
        rates,
        yerr=stds,
        capsize=6,
        color=[f"C{i % 10}" for i in range(len(rows))],
        label=list(labels),
    )
    ax.bar_label(bars, [f"{i:.0f} img/s" if i else "" for i in images], padding=8, fontsize="small")
    ax.set_xticks(range(len(rows)), labels, rotation=15 if len(rows) > 3 else 0)
    ax.set_xlabel("run")
    ax.set_ylabel("training steps/s")
    ax.set_title("Training steps/s per run (error bars: std; above: unique images/s)")
    ax.margins(y=0.15)
    ax.legend(fontsize="small")
    return fig


def plot_runs(runs: list[Run], out: Path, smooth: float = 0.0) -> list[Path]:
    """Write every figure that the runs have data for; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if any(run.epochs for run in runs):
        written.append(save(error_figure(runs, "epoch"), out / "error_vs_epoch.png"))
        written.append(save(error_figure(runs, "time"), out / "error_vs_time.png"))
    if any("grad_norm" in s for run in runs for s in run.steps):
        written.append(save(grad_norm_figure(runs, smooth), out / "grad_norm.png"))
    if any(throughput(run) for run in runs):
        written.append(save(throughput_figure(runs), out / "steps_per_s.png"))
    return written


def describe(run: Run) -> str:
    """One line per run: what the figures show of it."""
    parts = [f"{run.label}: {run.path}", f"{len(run.epochs)} epoch(s)"]
    if run.epochs:
        errors = [100 - e["top1"] for e in run.epochs]
        parts.append(f"val error {errors[-1]:.1f}% (best {min(errors):.1f}%)")
    rate = throughput(run)
    if rate:
        parts.append(f"{rate[0]:.2f} ± {rate[1]:.2f} steps/s")
    if not any("grad_norm" in s for s in run.steps):
        parts.append("no grad_norm")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.jsonl")
    parser.add_argument("--out", help="folder for the PNGs (default: the first RUN_DIR)")
    parser.add_argument(
        "--smooth",
        type=finite_float,
        default=0.0,
        metavar="BETA",
        help="EMA of the gradient norm, 0 <= BETA < 1 (e.g. 0.9; default 0: raw)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        parser.error(f"--smooth must be in [0, 1), got {args.smooth}")
    try:
        runs = [load_run(folder) for folder in args.runs]
        label_runs(runs)
        written = plot_runs(runs, Path(args.out or args.runs[0]), args.smooth)
        if not written:
            raise UsageError(f"nothing to plot: no epoch, step or summary records in {', '.join(args.runs)}")
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for run in runs:
        print(describe(run))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
