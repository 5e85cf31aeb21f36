"""Where the time goes: the loader alone, and training steps fed by it or from memory.

    dali-ba profile pipeline --train data/demo/train --views 1,2,4,8,16
    dali-ba profile pipeline --views 1,4 --augment imagenet,trivial,randaugment
    dali-ba profile step --recipe pipelines/demo.toml --steps 30 --out runs/profile/r1
    horovodrun -np 2 dali-ba profile step --recipe pipelines/demo.toml --out runs/profile/r2
    dali-ba profile views --recipe pipelines/demo.toml --views 1,2,4,8,16 --tolerance 0.1 --out runs/profile/views
    dali-ba profile collect runs/profile/r1 runs/profile/r2 --out runs/profile/summary.md

``pipeline`` times the DALI loader with no consumer, for each augmentation and M: samples/s,
views/s, and what each view costs beyond the first augmentation listed (auto-augmentation's price).
``step`` times the same training steps three ways: the loader alone, steps fed from batches cached
in memory beforehand (no data cost at all), and steps fed by the loader as in training. The data
stall, (t_loader - t_memory) / t_loader, is the share of a training step that the loader costs:
the wait for a batch plus the slow-down of sharing cores (or the GPU) with it. The measured wait
alone is reported beside it, and where the step's time goes (data, h2d, forward_backward,
allreduce_step, as dali_ba.train records them). Each of the three is timed as dali_ba.train runs its
steps: --warmup untimed steps, then --steps N steps between two synchronisations of the device and
none inside (:data:`TIMING_RULE`), so the loader's next batch overlaps this step's compute as in
training; a step's time is the seconds between the two / N, and the phases and the spread over steps
come from the step clock's rows, read after the second. ``views`` runs ``step`` at each M (the recipe's B per
rank) with the ranks joined once, and names the free views: the largest measured M whose step time
fed by the loader is at most (1 + tolerance) x M = 1's, each M judged on its own (the paper's
Figure 5: where compute is to spare, M views cost almost nothing; on a CPU it is honestly 1). Rank 0
writes <out>/profile_pipeline.{json,png}, profile_step.json or profile_views.{json,png}; the last two
also as they go (after each window, after each M), marked "complete": false until the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dali_ba.distributed.launcher import launcher_rank
from dali_ba.errors import OneLineParser, UnreadableImageError, UsageError, finite_float
from dali_ba.loading.augment import AUGMENTATIONS, MAGNITUDE_BINS, MAX_AUTO_OPS
from dali_ba.recipe import Recipe, build_parser, int_list, resolve
from dali_ba.tools.step_timing import (
    TIMING_RULE,
    YIELD_VARIABLE,
    endless,
    load_step_data,
    measure_step,
    time_window,
    write_json,
)
from dali_ba.training.step_clock import StepClock

PROG = "dali-ba profile"
STEP_FILE = "profile_step.json"


def _at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    return convert


def _augments(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected names among {', '.join(AUGMENTATIONS)}, got {text!r}")
    return names


def _views(text: str) -> list[int]:
    values = int_list(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _views_from_one(text: str) -> list[int]:
    """M values to sweep, sorted, with M = 1 among them: the step time the others are compared with."""
    values = sorted(set(_views(text)))
    if values[0] != 1:
        raise argparse.ArgumentTypeError(f"must include 1 (the step time the others are compared with), got {text!r}")
    return values


def _fraction(text: str) -> float:
    """A tolerance: a fraction above 0 and below 10 (0.1 is 10 %)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0 < value < 10:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a fraction > 0 and < 10 (0.1 is 10%), got {text}")
    return value


# --- pipeline: the loader alone over a sweep of M ---------------------------------------------------


def profile_pipeline(args: argparse.Namespace) -> dict:
    """Loader throughput for each augmentation and M: B samples decoded once, B*M views, per batch.
    ``extra_ms_per_view``: (batch time - the first augmentation's at that M) / (B*M)."""
    from dali_ba.data.dataset import load_dataset
    from dali_ba.loading.loader import BatchAugmentLoader

    dataset = load_dataset(args.train)
    baseline: dict[Any, Any]
    rows, decoder, device, baseline = [], None, None, {}
    for augment, views in itertools.product(args.augment, args.views):
        loader = BatchAugmentLoader(
            dataset,
            args.batch_size,
            views,
            args.view_size,
            augment=augment,
            crop_area_min=args.crop_area_min,
            randaugment_n=args.randaugment_n,
            randaugment_m=args.randaugment_m,
            decoder=args.decoder,
            num_threads=args.dali_threads,
        )
        decoder, device = loader.decoder, loader.device
        window = time_window(endless(loader), args.warmup, args.steps, None, StepClock(loader.device))
        batch_time = window.seconds / args.steps
        samples_per_s = args.batch_size / batch_time
        baseline.setdefault(views, batch_time)
        rows.append(
            dict(
                augment=augment,
                views=views,
                batch_time=batch_time,
                batch_time_std=float(np.std([row[-1] for row in window.rows])),
                samples_per_s=samples_per_s,
                views_per_s=views * samples_per_s,
                extra_ms_per_view=1e3 * (batch_time - baseline[views]) / (args.batch_size * views),
            )
        )
    return dict(
        kind="profile_pipeline",
        train=str(args.train),
        batch_size=args.batch_size,
        view_size=args.view_size,
        augments=args.augment,
        randaugment_n=args.randaugment_n,
        randaugment_m=args.randaugment_m,
        dali_threads=args.dali_threads,
        decoder=decoder,
        device=str(device),
        steps=args.steps,
        warmup=args.warmup,
        steps_per_epoch=len(loader),
        timing=TIMING_RULE,
        results=rows,
    )


def pipeline_figure(result: dict):
    from dali_ba.tools.plot import new_figure

    fig, ax = new_figure()
    augments = result.get("augments", ["imagenet"])
    for augment in augments:
        rows = [r for r in result["results"] if r.get("augment", "imagenet") == augment]
        views = [r["views"] for r in rows]
        named = f"{augment}: " if len(augments) > 1 else ""
        ax.plot(views, [r["views_per_s"] for r in rows], "o-", label=f"{named}views/s (M x samples/s)")
        ax.plot(views, [r["samples_per_s"] for r in rows], "s--", label=f"{named}samples/s (each decoded once)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(views, [str(v) for v in views])
    ax.set_xlabel("M (augmented views per sample)")
    ax.set_ylabel("throughput (per second)")
    ax.set_title(
        f"Loader alone: B={result['batch_size']}, {result['view_size']} px, "
        f"{result['dali_threads']} DALI thread(s), {result['decoder']} decoder"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def run_pipeline(args: argparse.Namespace) -> int:
    from dali_ba.tools.plot import save

    result = profile_pipeline(args)
    out = Path(args.out)
    write_json(out / "profile_pipeline.json", result)
    save(pipeline_figure(result), out / "profile_pipeline.png")
    print(
        f"loader alone: {result['train']}, B={result['batch_size']}, {result['view_size']} px, "
        f"{result['dali_threads']} DALI thread(s), {result['decoder']} decoder, "
        f"{args.steps} batches after {args.warmup}"
    )
    first = result["augments"][0]
    print(
        f"{'M':>4} {'batch ms':>10} {'± std':>8} {'samples/s':>11} {'views/s':>11}  "
        f"{'augment':<12} {f'ms/view over {first}':>22}"
    )
    for r in result["results"]:
        print(
            f"{r['views']:>4} {1e3 * r['batch_time']:>10.1f} {1e3 * r['batch_time_std']:>8.1f} "
            f"{r['samples_per_s']:>11.1f} {r['views_per_s']:>11.1f}  "
            f"{r['augment']:<12} {r['extra_ms_per_view']:>+22.3f}"
        )
    print(f"wrote {out / 'profile_pipeline.json'}, {out / 'profile_pipeline.png'}")
    return 0


# --- step: training steps fed by the loader vs from memory ------------------------------------------


def profile_step(
    recipe: Recipe, steps: int, warmup: int, cache: int, progress: Callable[[dict], None] | None = None
) -> dict | None:
    """Join the ranks, time one recipe's steps (:func:`measure_step`, which hands rank 0's finished windows
    to ``progress``), leave. Rank 0 gets the result, the others None."""
    from dali_ba.distributed import join as distributed
    from dali_ba.training.models import check_model_name

    check_model_name(recipe.model.arch)  # before any rank starts
    world = distributed.init_world(recipe.run.engine, share_gpu=recipe.run.share_gpu)
    train_set = load_step_data(recipe, world)
    result = measure_step(world, recipe, train_set, steps, warmup, cache, progress)
    world.close()
    return result


def run_step(args: argparse.Namespace) -> int:
    path = Path(args.out) / STEP_FILE
    # Rewritten after each timed window ("complete": false until the last): a run killed at a time limit
    # (the GPU check's) leaves the windows it finished.
    result = profile_step(
        resolve(args), args.steps, args.warmup, args.cache_batches, lambda partial: write_json(path, partial)
    )
    if result is None:
        return 0
    write_json(path, result)
    p, mem, fed = result["pipeline"], result["memory"], result["loader"]
    print(
        f"profile step: {result['arch']}, {result['ranks']} rank(s) on {result['device']}, "
        f"B={result['batch_size']} x M={result['views']}, {result['view_size']} px, {result['dali_threads']} DALI + "
        f"{result['torch_threads']} torch thread(s) per rank on {result['cores']} cores"
        + (" (oversubscribed)" if result["oversubscribed"] else "")
        + f", {args.steps} steps after {args.warmup}"
    )
    print(f"{'':<20} {'ms/step':>9} {'± std':>7} {'wait ms':>8} {'steps/s':>8} {'img/s':>8} {'views/s':>9}")
    print(
        f"{'loader alone':<20} {1e3 * p['batch_time']:>9.1f} {1e3 * p['batch_time_std']:>7.1f} {'':>8} "
        f"{1 / p['batch_time']:>8.2f} {p['samples_per_s']:>8.0f} {p['views_per_s']:>9.0f}"
    )
    for name, s in (("steps from memory", mem), ("steps with loader", fed)):
        print(
            f"{name:<20} {1e3 * s['step_time']:>9.1f} {1e3 * s['step_time_std']:>7.1f} {1e3 * s['data_wait']:>8.1f} "
            f"{s['steps_per_s']:>8.2f} {s['images_per_s']:>8.0f} {s['views_per_s']:>9.0f}"
        )
    print(
        f"data stall {100 * result['data_stall']:.1f}% of the step ((t_loader - t_memory) / t_loader, "
        f"raw {100 * result['data_stall_raw']:+.1f}%, of medians {100 * result['data_stall_median']:+.1f}%); "
        f"waiting for data {100 * result['data_wait_share']:.1f}% "
        f"({100 * result['epoch_start_wait_share']:.1f}% at the {result['epoch_starts']} epoch start(s)); "
        f"compute step / loader batch = {result['compute_per_loader_batch']:.2f}"
    )
    if result["oversubscribed"] and result["ranks"] > 1 and result["mpi_yield_when_idle"] != "1":
        print(
            f"note: more threads than cores: Open MPI spinning while it waits takes cores from DALI and torch; "
            f"try {YIELD_VARIABLE}=1"
        )
    print(f"wrote {Path(args.out) / STEP_FILE}")
    return 0


# --- collect: one table from many step profiles ------------------------------------------------------

COLUMNS = (
    ("nodes", "nodes", "{}"),
    ("ranks", "ranks", "{}"),
    ("M", "views", "{}"),
    ("B", "batch_size", "{}"),
    ("model", "arch", "{}"),
    ("px", "view_size", "{}"),
    ("device", "device", "{}"),
    ("steps/s", "steps_per_s", "{:.2f}"),
    ("img/s", "images_per_s", "{:.0f}"),
    ("views/s", "views_per_s", "{:.0f}"),
    ("loader alone img/s", "loader_alone_images_per_s", "{:.0f}"),
    ("compute / loader batch", "compute_per_loader_batch", "{:.1f}"),
    ("data stall", "data_stall", "{:.1%}"),
    ("data wait", "data_wait_share", "{:.1%}"),
)


def collect(paths: list[str]) -> list[dict]:
    """One row per profile_step.json (a folder holding one, or the file), sorted by ranks, M, B."""
    rows = []
    for given in paths:
        path = Path(given)
        path = path / STEP_FILE if path.is_dir() else path
        if not path.is_file():
            raise UsageError(f"no step profile: {path} not found (run `{PROG} step --out DIR` first)")
        try:
            data = json.loads(path.read_text())
            if data.get("complete") is False:  # written as it went by a run that did not finish
                windows = ", ".join(data.get("windows", [])) or "no"
                raise UsageError(f"{path}: an incomplete step profile (its run stopped after the {windows} window)")
            row = {key: data[key] for _, key, _ in COLUMNS if key not in ("nodes", "loader_alone_images_per_s")}
            row["loader_alone_images_per_s"] = data["pipeline"]["samples_per_s"]
            row["nodes"] = ",".join(data.get("nodes", ["?"]))  # profiles from before nodes were recorded: "?"
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{path}: not a step profile ({type(exc).__name__}: {exc})") from None
        rows.append({**row, "source": str(path)})
    return sorted(rows, key=lambda row: (row["ranks"], row["views"], row["batch_size"], row["source"]))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_collect(args: argparse.Namespace) -> int:
    rows = collect(args.dirs)
    out = Path(args.out)
    table = markdown_table(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    write_json(out.with_suffix(".json"), {"kind": "profile_collect", "rows": rows})
    print(table, end="")
    print(f"wrote {out}, {out.with_suffix('.json')}")
    return 0


# --- command line ----------------------------------------------------------------------------------


def build_cli() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{pipeline,step,views,collect}")
    pipe = commands.add_parser(
        "pipeline",
        help="the loader alone over a sweep of M",
        description="Throughput of the DALI loader alone, for each M.",
    )
    pipe.add_argument(
        "--train", default="data/demo/train", help="training data folder or .txt list (default: %(default)s)"
    )
    pipe.add_argument(
        "--views",
        type=_views,
        default=[1, 2, 4, 8, 16],
        metavar="M,M,...",
        help="values of M to sweep (default: 1,2,4,8,16)",
    )
    pipe.add_argument("--batch-size", type=_at_least(1), default=64, help="B, samples per batch (default: %(default)s)")
    pipe.add_argument("--view-size", type=_at_least(1), default=32, help="view side, pixels (default: %(default)s)")
    pipe.add_argument(
        "--crop-area-min",
        type=finite_float,
        default=0.35,
        help="smallest crop area fraction (default: %(default)s, as the demo recipe)",
    )
    pipe.add_argument(
        "--augment",
        type=_augments,
        default=["imagenet"],
        metavar="NAME,NAME,...",
        help="augmentations to time, each over the M sweep; the first is the baseline of the "
        "extra cost per view (default: imagenet)",
    )
    pipe.add_argument(
        "--randaugment-n",
        type=_at_least(1, MAX_AUTO_OPS),
        default=2,
        help="randaugment: ops per view (default: %(default)s)",
    )
    pipe.add_argument(
        "--randaugment-m",
        type=_at_least(0, MAGNITUDE_BINS - 1),
        default=9,
        help="randaugment: magnitude bin, 0-30 (default: %(default)s)",
    )
    pipe.add_argument("--dali-threads", type=_at_least(1), default=1, help="DALI CPU threads (default: %(default)s)")
    pipe.add_argument("--decoder", default="auto", help="auto, cpu or mixed (default: %(default)s)")
    step = commands.add_parser(
        "step",
        parents=[build_parser(f"{PROG} step", "")],
        conflict_handler="resolve",
        help="training steps fed by the loader vs from memory: the data stall",
        description="Training steps fed by the loader vs from batches in memory. "
        "Takes every training flag; B is the global batch.",
    )
    sweep = commands.add_parser(
        "views",
        parents=[build_parser(f"{PROG} views", "")],
        conflict_handler="resolve",
        help="training steps at each M: the views that come (almost) free",
        description="Training steps at each M, fed by the loader and from memory: step time, "
        "views/s, data stall, and the largest M whose step time stays within "
        "--tolerance of M = 1's. Takes every training flag but the recipe's "
        "--views; B is the global batch.",
    )
    sweep.add_argument(
        "--views",
        dest="view_counts",
        type=_views_from_one,
        default=[1, 2, 4, 8, 16],
        metavar="M,M,...",
        help="values of M to train, 1 among them (default: 1,2,4,8,16)",
    )
    sweep.add_argument(
        "--tolerance",
        type=_fraction,
        default=0.10,
        metavar="FRACTION",
        help="step time over M = 1's that still counts as free, a fraction (default: %(default)s, i.e. 10%%)",
    )
    for sub in (step, sweep):
        sub.add_argument(
            "--cache-batches",
            type=_at_least(1),
            default=8,
            help="distinct batches held in memory for the memory-fed steps (default: %(default)s)",
        )
    for sub, steps, warmup in ((pipe, 20, 3), (step, 30, 5), (sweep, 30, 5)):
        sub.add_argument("--steps", type=_at_least(1), default=steps, help="timed batches/steps (default: %(default)s)")
        sub.add_argument(
            "--warmup", type=_at_least(0), default=warmup, help="untimed batches/steps first (default: %(default)s)"
        )
        sub.add_argument("--out", default="runs/profile", help="output folder (default: %(default)s)")
    merge = commands.add_parser(
        "collect",
        help="merge profile_step.json files into one table",
        description="Merge step profiles (e.g. a sweep over ranks x M) into one table.",
    )
    merge.add_argument("dirs", nargs="+", metavar="DIR", help="folders holding profile_step.json (or the files)")
    merge.add_argument("--out", required=True, metavar="FILE", help="markdown table; the JSON goes beside it (.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_cli().parse_args(argv)
    try:
        from dali_ba.tools.profile_views import run_views  # its own module; it builds on this one's step profile

        return {"pipeline": run_pipeline, "step": run_step, "views": run_views, "collect": run_collect}[args.command](
            args
        )
    except UsageError as exc:
        # Set-up problems are the same on every rank: rank 0 speaks. A bad file is one rank's find.
        if launcher_rank() == 0 or isinstance(exc, UnreadableImageError):
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
