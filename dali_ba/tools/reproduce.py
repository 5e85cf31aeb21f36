"""The paper at small scale: Figures 2-5 of Hoffer et al. in direction, with seeds and a report.

    dali-ba reproduce [--out runs/paper] [--seeds 0,1] [--epochs 10] [--quick] [--compare RESULTS_JSON]
    make paper   (compared with the committed benchmarks/results/paper/results.json)

Two data sets are made on the spot under <out>/data: the embedded synthetic demo data (10 classes of
shapes) and scikit-learn's handwritten digits (real 8x8 scans, upscaled to 32 px JPEGs). On each, for
every seed, one process trains ResNet-20 with the demo recipe's augmentation at B = 32:

- Figures 2 and 3: Batch Augmentation with M = 1 (the baseline), 2, 4, 8 at the same B and LR regime,
  logging the gradient norm every step;
- Figure 4: regime adaptation with factor 4 (B*4 unique images x 1 view, 4 x the epochs), beside
  the baseline and M = 4;
- Figure 5: steps/s and the per-step phase times of all those runs;
- every BA run also validates over 4 augmented views (--eval-views 4) and after BatchNorm
  recalibration on 4 training batches (--calibrate-bn 4): do they help at M = 4?

Writes <out>/runs/<data>/<run>/ (each run's folder), <out>/fig2_*.png ... fig5.png, <out>/results.json
(every number) and <out>/REPORT.md, which says for each figure whether the paper's direction held,
as mean +- std over the seeds, and the machine it ran on (CPU model, torch's CPU kernels, versions,
commit). ``--compare`` sets it beside another report: how far each run moved between the two (another
machine's kernels move it; a second run on this machine should move nothing) against the spread between
seeds, and whether each verdict holds on both. ``--quick`` (the test suite's) makes tiny data and trains
a few steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dali_ba.errors import OneLineParser, UsageError
from dali_ba.machine import describe_machine, machine_line
from dali_ba.recipe import int_list
from dali_ba.tools.plot import Run, ema, load_run, new_figure, save

PROG = "dali-ba reproduce"
VIEWS = (1, 2, 4, 8)
RA_FACTOR = 4
EVAL_VIEWS, CALIBRATE_BN = 4, 4
SMOOTH = 0.9  # EMA of the gradient norm in Figure 2


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    seed: int
    views: int
    regime: str = "ba"

    @property
    def name(self) -> str:
        return f"{'ra' if self.regime == 'ra' else 'm'}{self.views}_seed{self.seed}"

    @property
    def label(self) -> str:
        return f"RA x{self.views}" if self.regime == "ra" else f"M={self.views}"


@dataclass
class ExperimentGrid:
    """The experiment grid: every data set x seed x M (and regime adaptation), and the schedule each run trains."""

    epochs: int
    batch: int = 32
    max_steps: int = 0
    views: tuple[int, ...] = VIEWS
    seeds: tuple[int, ...] = (0, 1)
    extra: list[str] = field(default_factory=list)

    def runs(self, datasets: list[str]) -> list[RunSpec]:
        specs = []
        for dataset in datasets:
            for seed in self.seeds:
                specs += [RunSpec(dataset, seed, m) for m in self.views]
                specs.append(RunSpec(dataset, seed, RA_FACTOR, "ra"))
        return specs

    def decay_epochs(self) -> str:
        return ",".join(str(round(self.epochs * f)) for f in (0.6, 0.8))


def make_datasets(root: Path, quick: bool) -> dict[str, Path]:
    """The two data sets, written once (kept if already complete)."""
    from dali_ba.data.digits import write_digits
    from dali_ba.data.synth import write_dataset

    made = {}
    for name, write in (
        ("synthetic", lambda p: write_dataset(p, *((4, 2) if quick else (48, 25)), seed=0)),
        ("digits", lambda p: write_digits(p, *((60, 30) if quick else (400, 400)), seed=0)),
    ):
        folder = root / name
        if not (folder / ".complete").exists():
            write(folder)
            (folder / ".complete").touch()
        made[name] = folder
    return made


def train(spec: RunSpec, data: Path, output: Path, grid: ExperimentGrid) -> Path:
    """One training process (no launcher: one rank, no engine); its run folder."""
    if (output / "metrics.jsonl").exists() and '"kind": "summary"' in (output / "metrics.jsonl").read_text():
        return output  # finished in an earlier invocation
    if output.exists():
        import shutil

        shutil.rmtree(output)
    argv = [
        sys.executable,
        "-m",
        "dali_ba.train",
        "--recipe",
        "demo",
        "--train",
        str(data / "train"),
        "--val",
        str(data / "val"),
        "--output",
        str(output),
        "--seed",
        str(spec.seed),
        "--views",
        str(spec.views),
        "--regime",
        spec.regime,
        "--batch-size",
        str(grid.batch),
        "--lr",
        "0.1",
        "--lr-batch",
        str(grid.batch),
        "--epochs",
        str(grid.epochs),
        "--decay-epochs",
        grid.decay_epochs(),
        "--warmup-epochs",
        "1",
        "--log-every",
        "50",
        "--log-grad-norm",
        "--timing-warmup",
        "2",
        "--torch-threads",
        str(len(os.sched_getaffinity(0))),
        "--engine",
        "auto",
        *grid.extra,
    ]
    if spec.regime == "ba":  # regime adaptation validates 4x as often (4x the epochs): spare it these two
        argv += ["--eval-views", str(EVAL_VIEWS), "--calibrate-bn", str(CALIBRATE_BN)]
    if grid.max_steps:
        argv += ["--max-steps", str(grid.max_steps)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise UsageError(f"training run {output} failed (exit {done.returncode}): {lines[-1]}")
    return output


# Numbers -------------------------------------------------------------------------------------------


def errors(run: Run) -> list[float]:
    return [100 - e["top1"] for e in run.epochs]


def epochs_to_reach(run: Run, target: float) -> int | None:
    """First epoch (1-based) whose validation error is at most ``target``; None if never."""
    return next((i for i, e in enumerate(errors(run), 1) if e <= target), None)


def late_grad_norm(run: Run, share: float = 0.25) -> float:
    """Mean gradient norm over the last ``share`` of the steps (the paper's Figure 2 reads the level)."""
    norms = [s["grad_norm"] for s in run.steps if "grad_norm" in s]
    return float(np.mean(norms[-max(1, int(len(norms) * share)) :]))


def mean_std(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": [float(v) for v in values]}


def fmt(stats: dict[str, Any], digits: int = 1) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def analyse(runs: dict[RunSpec, Run], grid: ExperimentGrid, datasets: list[str]) -> dict:
    """Every number the report states, per data set."""
    results: dict = {}
    for dataset in datasets:

        def of(views: int, regime: str = "ba") -> list[Run]:
            return [runs[RunSpec(dataset, s, views, regime)] for s in grid.seeds]  # noqa: B023 - used in this pass only

        baseline = of(1)
        per_m: dict = {}
        for m in grid.views:
            mine = of(m)
            reach = [epochs_to_reach(run, errors(base)[-1]) for run, base in zip(mine, baseline)]
            per_m[m] = {
                "final_error": mean_std([errors(r)[-1] for r in mine]),
                "best_error": mean_std([min(errors(r)) for r in mine]),
                "epochs_to_baseline_final": reach,
                "late_grad_norm": mean_std([late_grad_norm(r) for r in mine]),
                "steps_per_s": mean_std([r.summary["steps_per_s"] for r in mine]),  # type: ignore[index]  # finished runs: summary is set
                "phases_ms": {
                    p: mean_std([1e3 * r.summary["timing"][p]["mean"] for r in mine])  # type: ignore[index]  # finished runs: summary is set
                    for p in ("data", "h2d", "forward_backward", "allreduce_step", "step")
                },
                "wall_s": mean_std([r.epochs[-1]["wall"] for r in mine]),
                "eval": {
                    kind: mean_std([100 - r.epochs[-1][key] for r in mine])
                    for kind, key in (("plain", "top1"), ("views", "views_top1"), ("calibrated", "calibrated_top1"))
                },
            }
        ra = of(RA_FACTOR, "ra")
        results[dataset] = {
            "views": per_m,
            "ra": {
                "final_error": mean_std([errors(r)[-1] for r in ra]),
                "wall_s": mean_std([r.epochs[-1]["wall"] for r in ra]),
                "epochs": len(ra[0].epochs),
                "steps": ra[0].summary["steps"],  # type: ignore[index]  # finished runs: summary is set
            },
            "steps_per_run": baseline[0].summary["steps"],  # type: ignore[index]  # finished runs: summary is set
        }
    return results


def verdicts(results: dict, grid: ExperimentGrid) -> dict[str, dict[str, str]]:
    """For each figure and data set: 'held' or 'did not hold', and why (from the means)."""
    out: dict[str, dict[str, str]] = {}
    for dataset, r in results.items():
        v = r["views"]
        base = v[1]["final_error"]["mean"]
        larger = [m for m in grid.views if m > 1]
        better = [m for m in larger if v[m]["final_error"]["mean"] < base]
        reached = {m: v[m]["epochs_to_baseline_final"] for m in larger}
        faster = [m for m in larger if all(e is not None and e < grid.epochs for e in reached[m])]
        fig3 = (
            f"held for M = {', '.join(map(str, better))}"
            if better == larger
            else f"did not hold for M = {', '.join(str(m) for m in larger if m not in better)}"
        )
        out.setdefault("fig3", {})[dataset] = (
            f"{fig3}: final validation error "
            + ", ".join(f"M={m} {fmt(v[m]['final_error'])} %" for m in grid.views)
            + ". Epochs to reach the baseline's final error: "
            + ", ".join(f"M={m} {reached[m]}" for m in larger)
            + f" (baseline: {grid.epochs}; None: not reached); "
            + (
                f"fewer epochs in every seed for M = {', '.join(map(str, faster))}."
                if faster
                else "no M reached it in fewer epochs in every seed."
            )
        )
        norms = [v[m]["late_grad_norm"]["mean"] for m in grid.views]
        falling = all(a > b for a, b in zip(norms, norms[1:]))
        out.setdefault("fig2", {})[dataset] = (
            ("held" if falling else "did not hold")
            + ": gradient L2 norm over the last quarter of the steps "
            + ", ".join(f"M={m} {fmt(v[m]['late_grad_norm'], 3)}" for m in grid.views)
            + (" (falls as M grows)." if falling else " (does not fall monotonically with M).")
        )
        ba4, ra = v[RA_FACTOR]["final_error"]["mean"], r["ra"]["final_error"]["mean"]
        held = ba4 < base and ba4 < ra
        out.setdefault("fig4", {})[dataset] = (
            ("held" if held else "did not hold") + f": final validation error baseline {fmt(v[1]['final_error'])} %, "
            f"BA M={RA_FACTOR} {fmt(v[RA_FACTOR]['final_error'])} %, regime adaptation x{RA_FACTOR} "
            f"{fmt(r['ra']['final_error'])} % ({r['ra']['epochs']} epochs, {r['ra']['steps']} steps; "
            f"BA {r['steps_per_run']} steps); "
            f"wall-clock s: baseline {fmt(v[1]['wall_s'], 0)}, "
            f"BA {fmt(v[RA_FACTOR]['wall_s'], 0)}, RA {fmt(r['ra']['wall_s'], 0)}."
        )
        rates = {m: v[m]["steps_per_s"]["mean"] for m in grid.views}
        flat = min(rates.values()) >= 0.9 * rates[1]
        out.setdefault("fig5", {})[dataset] = (
            ("held" if flat else "did not hold")
            + ": steps/s "
            + ", ".join(f"M={m} {fmt(v[m]['steps_per_s'], 2)}" for m in grid.views)
            + (
                " stay within 10 % of the baseline's."
                if flat
                else f" (M={max(grid.views)} runs at {rates[max(grid.views)] / rates[1]:.2f}x the baseline's rate: "
                "on this "
                "CPU-only machine the step is compute-bound, so its time grows with B*M; the paper's flat steps/s "
                "needs accelerators with compute to spare). Data loading stays a small share of the step: "
                + ", ".join(
                    f"M={m} {v[m]['phases_ms']['data']['mean']:.1f} of {v[m]['phases_ms']['step']['mean']:.0f} ms"
                    for m in grid.views
                )
                + "."
            )
        )
        e = v[RA_FACTOR]["eval"]
        out.setdefault("eval", {})[dataset] = (
            f"at M={RA_FACTOR}, final validation error: centre crop {fmt(e['plain'])} %, averaged over {EVAL_VIEWS} "
            f"augmented views {fmt(e['views'])} % ("
            f"{'helps' if e['views']['mean'] < e['plain']['mean'] else 'does not help'}), "
            f"after BatchNorm recalibration on {CALIBRATE_BN} batches {fmt(e['calibrated'])} % "
            f"({'helps' if e['calibrated']['mean'] < e['plain']['mean'] else 'does not help'})."
        )
    return out


def run_finals(results: dict) -> dict[str, float]:
    """Each run's final validation error, '<data set>/<run>' -> %, from a results.json's numbers
    (the seeds' values are in the grid's seed order; older reports have no per-run table)."""
    finals = {}
    for dataset, r in results.items():
        for m, per in r["views"].items():
            for index, value in enumerate(per["final_error"]["values"]):
                finals[f"{dataset}/m{m}#{index}"] = value
        for index, value in enumerate(r["ra"]["final_error"]["values"]):
            finals[f"{dataset}/ra#{index}"] = value
    return finals


def between_machines(mine: dict, theirs: dict) -> dict[str, Any]:
    """This report against another one of the same grid (another machine, or this one again): how far
    each run's final error moved between them beside how far it moves between seeds, whether the
    parameters came out bit for bit the same, and whether each verdict holds on both."""
    here, there = run_finals(mine["results"]), run_finals(theirs["results"])
    common = sorted(set(here) & set(there))
    per_dataset: dict[str, Any] = {}
    for dataset in mine["results"]:
        keys = [k for k in common if k.startswith(f"{dataset}/")]
        moves = [abs(here[k] - there[k]) for k in keys]
        seed_std = [per["final_error"]["std"] for per in mine["results"][dataset]["views"].values()]
        per_dataset[dataset] = {
            "runs": len(keys),
            "max_move": max(moves, default=0.0),
            "mean_move": float(np.mean(moves)) if moves else 0.0,
            "seed_std": float(np.mean(seed_std)),
        }
    digests_here, digests_there = mine.get("digests", {}), theirs.get("digests", {})
    both = sorted(set(digests_here) & set(digests_there))
    verdicts_both: dict[str, dict[str, Any]] = {}
    for figure, by_dataset in mine["verdicts"].items():
        if figure == "eval":  # a description, not a verdict
            continue
        for dataset, text in by_dataset.items():
            other = theirs["verdicts"].get(figure, {}).get(dataset, "")
            verdicts_both.setdefault(figure, {})[dataset] = {
                "here": text.startswith("held"),
                "there": other.startswith("held"),
            }
    return {
        "other_machine": theirs.get("machine"),
        "datasets": per_dataset,
        "identical_parameters": sum(digests_here[k] == digests_there[k] for k in both),
        "compared_parameters": len(both),
        "verdicts": verdicts_both,
    }


def comparison_lines(compared: dict[str, Any], other: Path) -> list[str]:
    """The report's section on the other report."""
    machine = compared["other_machine"]
    lines = [
        "## Between machines",
        "",
        f"Against `{other}`, measured on "
        + (machine_line(machine) if machine else "a machine it does not record (written before reports named theirs)")
        + ".",
        "",
        "| data set | runs compared | final error moved, max | mean | spread between seeds (std, mean over M) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for dataset, d in compared["datasets"].items():
        lines.append(
            f"| {dataset} | {d['runs']} | {d['max_move']:.1f} points | {d['mean_move']:.1f} points | "
            f"{d['seed_std']:.1f} points |"
        )
    if compared["compared_parameters"]:
        lines += [
            "",
            f"Parameters identical bit for bit in {compared['identical_parameters']} of "
            f"{compared['compared_parameters']} runs.",
        ]
    lines += ["", "| figure | data set | holds here | holds there | on both |", "| --- | --- | --- | --- | --- |"]
    for figure, by_dataset in compared["verdicts"].items():
        for dataset, v in by_dataset.items():
            yes = {True: "yes", False: "no"}
            lines.append(
                f"| {figure} | {dataset} | {yes[v['here']]} | {yes[v['there']]} | {yes[v['here'] and v['there']]} |"
            )
    return [*lines, ""]


# Figures -------------------------------------------------------------------------------------------


def _band(ax, xs, rows, colour, label, style="-"):
    rows = np.array(rows)
    mean = rows.mean(0)
    ax.plot(xs, mean, style, color=colour, label=label)
    if len(rows) > 1 and style == "-":
        ax.fill_between(xs, rows.min(0), rows.max(0), color=colour, alpha=0.15, linewidth=0)


def figures(
    runs: dict[RunSpec, Run], grid: ExperimentGrid, datasets: list[str], results: dict, out: Path
) -> list[Path]:
    written = []
    seeds = f"mean of {len(grid.seeds)} seed(s), band: min-max"
    for dataset in datasets:
        fig, ax = new_figure()
        for index, m in enumerate(grid.views):
            group = [runs[RunSpec(dataset, s, m)] for s in grid.seeds]
            epochs = np.arange(1, len(group[0].epochs) + 1)
            _band(ax, epochs, [errors(r) for r in group], f"C{index}", f"M={m} validation")
            _band(
                ax,
                epochs,
                [[100 - e["train_top1"] for e in r.epochs] for r in group],
                f"C{index}",
                f"M={m} training",
                "--",
            )
        ax.set(
            xlabel="epoch", ylabel="error (%)", title=f"Figure 3, {dataset}: error vs epoch, B={grid.batch} ({seeds})"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", ncol=2)
        written.append(save(fig, out / f"fig3_{dataset}.png"))

        fig, ax = new_figure()
        for index, m in enumerate(grid.views):
            norms = [[s["grad_norm"] for s in runs[RunSpec(dataset, seed, m)].steps] for seed in grid.seeds]
            length = min(map(len, norms))
            _band(ax, np.arange(1, length + 1), [ema(g[:length], SMOOTH) for g in norms], f"C{index}", f"M={m}")
        ax.set_yscale("log")
        ax.set(
            xlabel="step",
            ylabel="gradient L2 norm (EMA, log scale)",
            title=f"Figure 2, {dataset}: gradient norm, EMA beta {SMOOTH} ({seeds})",
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
        written.append(save(fig, out / f"fig2_{dataset}.png"))

        fig = new_figure(11, 4.5)[0]
        fig.clear()
        axes = fig.subplots(1, 2)
        for index, (spec_views, regime, label) in enumerate(
            (
                (1, "ba", "baseline M=1"),
                (RA_FACTOR, "ba", f"BA M={RA_FACTOR}"),
                (RA_FACTOR, "ra", f"regime adaptation x{RA_FACTOR}"),
            )
        ):
            group = [runs[RunSpec(dataset, s, spec_views, regime)] for s in grid.seeds]
            epochs = np.arange(1, len(group[0].epochs) + 1)
            _band(axes[0], epochs, [errors(r) for r in group], f"C{index}", label)
            walls = np.mean([[e["wall"] for e in r.epochs] for r in group], axis=0)
            _band(axes[1], walls, [errors(r) for r in group], f"C{index}", label)
        axes[0].set(xlabel="epoch", ylabel="validation error (%)", title=f"Figure 4, {dataset}: vs epoch")
        axes[1].set(xlabel="wall-clock time (s)", ylabel="validation error (%)", title="vs wall-clock")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        written.append(save(fig, out / f"fig4_{dataset}.png"))

    fig = new_figure(11, 4.5)[0]
    fig.clear()
    rate_ax, phase_ax = fig.subplots(1, 2)
    for index, dataset in enumerate(datasets):
        v = results[dataset]["views"]
        rate_ax.errorbar(
            grid.views,
            [v[m]["steps_per_s"]["mean"] for m in grid.views],
            yerr=[v[m]["steps_per_s"]["std"] for m in grid.views],
            marker="o",
            capsize=4,
            color=f"C{index}",
            label=dataset,
        )
    rate_ax.set(
        xlabel="M (views per sample)", ylabel="training steps/s", title=f"Figure 5: steps/s vs M, B={grid.batch}"
    )
    rate_ax.set_xticks(grid.views)
    rate_ax.grid(alpha=0.3)
    rate_ax.legend(fontsize="small")
    v = results[datasets[0]]["views"]
    bottom = np.zeros(len(grid.views))
    for index, phase in enumerate(("data", "h2d", "forward_backward", "allreduce_step")):
        heights = np.array([v[m]["phases_ms"][phase]["mean"] for m in grid.views])
        phase_ax.bar([str(m) for m in grid.views], heights, bottom=bottom, color=f"C{index}", label=phase)
        bottom += heights
    phase_ax.set(xlabel="M", ylabel="ms per step", title=f"per-step phases, {datasets[0]}")
    phase_ax.legend(fontsize="small")
    written.append(save(fig, out / "fig5.png"))
    return written


def write_report(
    results: dict,
    found: dict,
    grid: ExperimentGrid,
    datasets: list[str],
    out: Path,
    elapsed: float,
    machine: dict[str, Any],
    compared: tuple[dict[str, Any], Path] | None = None,
) -> Path:
    titles = {
        "fig3": "Figure 3 — BA reaches lower error, and the baseline's error in fewer epochs",
        "fig2": "Figure 2 — the gradient norm falls as M grows",
        "fig4": "Figure 4 — BA beats the baseline and regime adaptation",
        "fig5": "Figure 5 — steps/s barely change with M",
        "eval": "Evaluation over augmented views and BatchNorm recalibration",
    }
    images = {
        "fig3": [f"fig3_{d}.png" for d in datasets],
        "fig2": [f"fig2_{d}.png" for d in datasets],
        "fig4": [f"fig4_{d}.png" for d in datasets],
        "fig5": ["fig5.png"],
        "eval": [],
    }
    lines = [
        "# Batch Augmentation at small scale: the paper's Figures 2-5 in direction",
        "",
        f"`{PROG}`: ResNet-20, B = {grid.batch} unique images per step, "
        f"M in {{{', '.join(map(str, grid.views))}}} "
        f"and regime adaptation x{RA_FACTOR}, {grid.epochs} epochs (LR 0.1, x0.1 at epochs {grid.decay_epochs()}, "
        f"1 warm-up epoch), seeds {', '.join(map(str, grid.seeds))}; one process on {os.cpu_count()} CPU cores. "
        f"Data: the synthetic demo set and scikit-learn's digits (real scans, 32 px JPEGs). "
        f"All numbers are mean ± std over the seeds; whole run {elapsed / 60:.1f} min.",
        "",
        f"Measured on {machine_line(machine)}. The same code and seeds give other numbers on a CPU whose "
        "kernels differ (see *Between machines* when a second report is compared).",
        "",
    ]
    for key, title in titles.items():
        lines += [f"## {title}", ""]
        for dataset in datasets:
            lines.append(f"- **{dataset}**: {found[key][dataset]}")
        lines.append("")
        lines += [f"![{name}]({name})" for name in images[key]] + ([""] if images[key] else [])
    if compared:
        lines += comparison_lines(*compared)
    lines += ["Every number is in `results.json`; each run's own records are under `runs/`.", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/paper", help="results folder (default: runs/paper)")
    parser.add_argument("--seeds", type=int_list, default=[0, 1], metavar="N,N,...", help="seeds (default: 0,1)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the BA runs (default: 10)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny data, 2 epochs of 2 steps, M in {1, 2}: a smoke test"
    )
    parser.add_argument(
        "--compare",
        metavar="RESULTS_JSON",
        help="another report's results.json (another machine's, or a second run here): how far each run moved "
        "between them beside the seeds' spread, and whether each verdict holds on both",
    )
    args = parser.parse_args(argv)
    other = None
    if args.compare:
        try:
            other = json.loads(Path(args.compare).read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--compare {args.compare}: cannot read it as JSON ({type(exc).__name__}: {exc})")
        if not isinstance(other, dict) or not {"results", "verdicts"} <= other.keys():
            parser.error(f"--compare {args.compare}: not a results.json of {PROG} (no results and verdicts)")
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2, got {args.epochs}")
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    grid = ExperimentGrid(
        epochs=2 if args.quick else args.epochs,
        batch=4 if args.quick else 32,
        max_steps=2 if args.quick else 0,
        views=(1, 2, 4) if args.quick else VIEWS,
        seeds=tuple(args.seeds),
        extra=["--timing-warmup", "0"] if args.quick else [],
    )
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {out}: cannot create it ({exc.strerror})")
    started = time.perf_counter()
    try:
        data = make_datasets(out / "data", args.quick)
        runs: dict[RunSpec, Run] = {}
        specs = grid.runs(list(data))
        for number, spec in enumerate(specs, 1):
            begun = time.perf_counter()
            folder = train(spec, data[spec.dataset], out / "runs" / spec.dataset / spec.name, grid)
            runs[spec] = load_run(folder)
            print(
                f"[{number}/{len(specs)}] {spec.dataset} {spec.label} seed {spec.seed}: val error "
                f"{errors(runs[spec])[-1]:.1f} %, {time.perf_counter() - begun:.0f} s",
                flush=True,
            )
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    datasets = list(data)
    results = analyse(runs, grid, datasets)
    found = verdicts(results, grid)
    written = figures(runs, grid, datasets, results, out)
    elapsed = time.perf_counter() - started
    machine = describe_machine()
    digests = {f"{spec.dataset}/{spec.name}": run.summary["param_digests"][0] for spec, run in runs.items()}  # type: ignore[index]  # finished runs: summary is set
    report_data = {"results": results, "verdicts": found, "machine": machine, "digests": digests}
    compared = (between_machines(report_data, other), Path(args.compare)) if other is not None else None
    # results.json names the grid "plan", as before: the file's keys are unchanged
    (out / "results.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "plan": {
                    "epochs": grid.epochs,
                    "batch": grid.batch,
                    "views": grid.views,
                    "seeds": grid.seeds,
                    "ra_factor": RA_FACTOR,
                    "eval_views": EVAL_VIEWS,
                    "calibrate_bn": CALIBRATE_BN,
                },
                "elapsed_s": elapsed,
                "results": results,
                "verdicts": found,
                "digests": digests,
                "between_machines": compared[0] if compared else None,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    report = write_report(results, found, grid, datasets, out, elapsed, machine, compared)
    print(report.read_text())
    print(f"wrote {report}, {out / 'results.json'} and {len(written)} figures in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
