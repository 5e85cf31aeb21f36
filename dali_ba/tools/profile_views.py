"""``dali-ba profile views``: the same training steps at each M, and the views that come
(almost) free — the paper's Figure 5 claim measured on this hardware (see :mod:`dali_ba.tools.profile`). Each M's
steps are timed as training runs them, N steps between two synchronisations (:data:`dali_ba.tools.profile.TIMING_RULE`):
a wait for the device after every step would hide the overlap that makes views free where compute is to spare."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

from dali_ba.recipe import Recipe, resolve
from dali_ba.tools.step_timing import load_step_data, measure_step, write_json

VIEWS_FILE, VIEWS_PLOT = "profile_views.json", "profile_views.png"


FREE_VIEWS_RULE = (
    "free_views: the largest measured M whose step time fed by the loader is at most (1 + tolerance) "
    "x the step time at M = 1; each M counts on its own, so a slower M in between (noise) does not "
    "hide a larger M within the tolerance"
)


def free_views(step_times: Mapping[int, float], tolerance: float) -> int:
    """The largest M whose step time is within ``tolerance`` (a fraction) of M = 1's: the paper's Figure 5
    claim, views that cost (almost) nothing where compute is to spare. The rule is :data:`FREE_VIEWS_RULE`."""
    if 1 not in step_times:
        raise ValueError(f"the step time at M = 1 is the reference and was not measured (M: {sorted(step_times)})")
    limit = (1 + tolerance) * step_times[1]
    return max(views for views, step_time in step_times.items() if step_time <= limit)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.2f}"


def _views_row(step: dict, reference_time: float, tolerance: float) -> dict:
    """One M's line of the views profile, from its step profile (``reference_time``: the step time at M = 1)."""
    fed = step["loader"]
    return dict(
        views=step["views"],
        step_time=fed["step_time"],
        step_time_std=fed["step_time_std"],
        step_time_median=fed["step_time_median"],
        step_time_ratio=fed["step_time"] / reference_time,
        within_tolerance=fed["step_time"] <= (1 + tolerance) * reference_time,
        steps_per_s=fed["steps_per_s"],
        samples_per_s=fed["images_per_s"],
        views_per_s=fed["views_per_s"],
        data_stall=step["data_stall"],
        data_stall_raw=step["data_stall_raw"],
        data_wait=fed["data_wait"],
        data_wait_share=step["data_wait_share"],
        memory_step_time=step["memory"]["step_time"],
        loader_alone_batch_time=step["pipeline"]["batch_time"],
        source_callback_time=step["source_callback_time"],
        phases=fed["phases"],
    )


def profile_views(
    recipe: Recipe,
    view_counts: list[int],
    tolerance: float,
    steps: int,
    warmup: int,
    cache: int,
    progress: Callable[[dict], None] | None = None,
) -> dict | None:
    """:func:`measure_step` at each M of ``view_counts`` (the recipe otherwise as given), the ranks joined
    once for the whole sweep. Rank 0 gets the sweep, the others None. After each M but the last, rank 0
    hands ``progress`` the sweep so far (``complete`` False, ``measured`` its Ms): a run killed at a time
    limit still leaves the Ms it finished."""
    from dali_ba.distributed import join as distributed
    from dali_ba.training.checks import check_world
    from dali_ba.training.models import check_model_name

    sweep = [
        dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, views=m)).validate() for m in view_counts
    ]
    check_model_name(recipe.model.arch)  # before any rank starts
    world = distributed.init_world(recipe.run.engine, share_gpu=recipe.run.share_gpu)
    train_set = load_step_data(recipe, world)
    for each in sweep:  # refuse an M that cannot fit before timing the others
        check_world(each, world, train_set)
    # rank 0 (the only one that reads them) gets each step's statistics, the others None
    steps_by_m: dict[int, dict] = {}
    for each in sweep:  # M = 1 first (view_counts is sorted, 1 among them): every partial sweep has its reference
        steps_by_m[each.data.views] = cast("dict", measure_step(world, each, train_set, steps, warmup, cache))
        if progress is not None and world.is_root and 1 in steps_by_m and len(steps_by_m) < len(sweep):
            progress(_views_result(steps_by_m, view_counts, tolerance))
    world.close()
    if not world.is_root:
        return None
    return dict(_views_result(steps_by_m, view_counts, tolerance), complete=True)


def _views_result(steps_by_m: dict[int, dict], view_counts: list[int], tolerance: float) -> dict:
    """The sweep over the Ms measured so far (``complete`` False: the caller marks a finished one);
    free_views is judged among those Ms only."""
    reference_time = steps_by_m[1]["loader"]["step_time"]
    rows = [_views_row(step, reference_time, tolerance) for step in steps_by_m.values()]
    first = steps_by_m[1]
    setting = {
        key: first[key]
        for key in (
            "train",
            "engine",
            "engine_backend",
            "ranks",
            "local_ranks",
            "batch_size",
            "per_rank_batch",
            "view_size",
            "arch",
            "amp",
            "chunks",
            "device",
            "decoder",
            "dali_threads",
            "torch_threads",
            "cores",
            "oversubscribed",
            "steps",
            "warmup",
            "timing",
            "cached_batches",
        )
    }
    return dict(
        kind="profile_views",
        complete=False,
        **setting,
        views=view_counts,
        measured=list(steps_by_m),
        tolerance=tolerance,
        free_views=free_views({row["views"]: row["step_time"] for row in rows}, tolerance),
        free_views_rule=FREE_VIEWS_RULE,
        results=rows,
    )


def views_figure(result: dict):
    """Step time (with the tolerance band over M = 1's) and views/s against M."""
    from dali_ba.tools.plot import new_figure

    fig, ax = new_figure(height=5.5)
    rows = result["results"]
    views = [r["views"] for r in rows]
    reference_ms = 1e3 * rows[0]["step_time"]
    tolerance = _percent(result["tolerance"])
    ax.axhspan(
        reference_ms,
        (1 + result["tolerance"]) * reference_ms,
        color="tab:green",
        alpha=0.15,
        label=f"within {tolerance} of M = 1",
    )
    ax.errorbar(
        views,
        [1e3 * r["step_time"] for r in rows],
        yerr=[1e3 * r["step_time_std"] for r in rows],
        fmt="o-",
        capsize=3,
        label="step time, fed by the loader",
    )
    ax.plot(views, [1e3 * r["memory_step_time"] for r in rows], "s--", label="step time, from memory")
    ax.axvline(result["free_views"], color="tab:green", linestyle=":", label=f"free views: M = {result['free_views']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(views, [str(v) for v in views])
    ax.set_xlabel("M (augmented views per sample)")
    ax.set_ylabel("step time (ms)")
    throughput = ax.twinx()
    throughput.plot(views, [r["views_per_s"] for r in rows], "^-", color="tab:purple", label="views/s (all ranks)")
    throughput.set_ylabel("views per second")
    ax.set_ylim(bottom=0)
    throughput.set_ylim(bottom=0)
    ax.set_title(
        f"{result['arch']}, {result['ranks']} rank(s) on {result['device']}, B={result['per_rank_batch']} per rank, "
        f"{result['view_size']} px, {result['decoder']} decoder"
    )
    ax.grid(alpha=0.3)
    handles, labels = (a + b for a, b in zip(ax.get_legend_handles_labels(), throughput.get_legend_handles_labels()))
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize="small")
    return fig


def views_table(result: dict) -> str:
    """The sweep as a Markdown table, one row per M."""
    tolerance = _percent(result["tolerance"])
    lines = [
        f"| M | ms/step | ± std | x M=1 | within {tolerance} | views/s | samples/s | data stall | data wait ms "
        "| source ms/batch |",
        "|" + " --- |" * 10,
    ]
    lines += [
        f"| {r['views']} | {1e3 * r['step_time']:.1f} | {1e3 * r['step_time_std']:.1f} | {r['step_time_ratio']:.2f} "
        f"| {'yes' if r['within_tolerance'] else 'no'} | {r['views_per_s']:.0f} | {r['samples_per_s']:.0f} "
        f"| {r['data_stall']:.1%} | {1e3 * r['data_wait']:.1f} | {_ms(r.get('source_callback_time'))} |"
        for r in result["results"]
    ]
    return "\n".join(lines) + "\n"


def run_views(args: argparse.Namespace) -> int:
    from dali_ba.tools.plot import save

    out = Path(args.out)
    # Rewritten after each M ("complete": false until the last, the plot only then): a run killed at a time
    # limit (the GPU check's) leaves the Ms it finished.
    result = profile_views(
        resolve(args),
        args.view_counts,
        args.tolerance,
        args.steps,
        args.warmup,
        args.cache_batches,
        lambda partial: write_json(out / VIEWS_FILE, partial),
    )
    if result is None:
        return 0
    write_json(out / VIEWS_FILE, result)
    save(views_figure(result), out / VIEWS_PLOT)
    print(
        f"profile views: {result['arch']}, {result['ranks']} rank(s) on {result['device']}, B={result['batch_size']} "
        f"({result['per_rank_batch']} per rank), {result['view_size']} px, {result['decoder']} decoder, "
        f"{args.steps} steps after {args.warmup} at each M"
    )
    print(views_table(result), end="")
    print(f"free views: M = {result['free_views']} (step time within {_percent(result['tolerance'])} of M = 1)")
    print(f"wrote {out / VIEWS_FILE}, {out / VIEWS_PLOT}")
    return 0
