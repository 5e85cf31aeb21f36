"""The GPU check's training steps: ``demo`` (the demo recipe: AMP, chunks, the torch engine, exact
mid-epoch resume), ``figure5`` and ``views`` (``dali-ba profile``), and ``compile`` (Figure 5
at one M with ``--compile``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from benchmarks.gpu_check.context import Ctx, ensure_images, gpu, read_json, recipe_flag
from benchmarks.gpu_check.processes import REPO, child_env, kill_tree, run_logged

CPU_DEMO_TOP1 = 84.5  # docs/measured.md: make demo (2 ranks, 2 CPU cores) reached top-1 84.5 %


# --- 4. the demo recipe ---------------------------------------------------------------------------------


def step_demo(ctx: Ctx) -> int:
    """The demo recipe trained on this machine, all runs at once: bf16; fp16 with --chunks 2 (bf16 on the
    CPU, where fp16 is refused); --engine torch (NCCL on a GPU, one rank); and exact mid-epoch resume:
    two uninterrupted runs (is training deterministic here?) and one stopped by SIGUSR1, resumed, all
    three with --deterministic."""
    from dali_ba.data.synth import write_dataset

    data = write_dataset(ctx.work / "demo", *ctx.sizes.demo_per_class, seed=0)
    cuda = gpu()
    # The runs whose parameters are compared train with --deterministic (deterministic kernels, [run]
    # deterministic), so that on a GPU too "resumed == uninterrupted" is decidable bit for bit.
    deterministic = recipe_flag("--deterministic")
    resume_args = ctx.sizes.resume_args + (("--deterministic",) if deterministic else ())
    runs = {
        "bf16": ctx.sizes.demo_args + ("--amp", "bf16"),
        "fp16_chunks2": ctx.sizes.demo_args + ("--amp", "fp16" if cuda else "bf16", "--chunks", "2"),
        "torch_engine": ctx.sizes.demo_args + ("--engine", "torch", "--amp", "bf16"),
        "resume_reference": resume_args,
        "resume_reference_again": resume_args,
        "resume_stopped": resume_args,
    }
    ctx.result["deterministic_flag"] = deterministic  # False: not in this checkout, the resume runs ran without it
    root = ctx.work / "demo_runs"
    root.mkdir(parents=True, exist_ok=True)  # made here: a trainer removes the folders its --output probe made
    outputs = {name: root / name for name in runs}
    started = {
        name: Training(train_command(data, outputs[name], flags), ctx.dir / f"{name}.log")
        for name, flags in runs.items()
    }
    stop = stop_mid_epoch(started["resume_stopped"], outputs["resume_stopped"], ctx)
    resumed = None
    if stop.get("rc") == 75:
        command = train_command(data, outputs["resume_stopped"], runs["resume_stopped"] + ("--resume", "auto"))
        resumed = Training(command, ctx.dir / "resume_stopped.log")
    for training in [*started.values(), resumed]:
        if training is not None:
            training.wait(ctx.deadline - 3)
    r = ctx.result
    r["runs"] = {
        name: dict(
            flags=" ".join(runs[name]), rc=started[name].rc, seconds=started[name].seconds, **run_summary(outputs[name])
        )
        for name in runs
    }
    r["runs"]["resume_stopped"]["rc_after_resume"] = resumed.rc if resumed else None
    for name in runs:  # the checkpoints and models stay in the scratch folder; the metrics are archived
        if (outputs[name] / "metrics.jsonl").exists():
            shutil.copy(outputs[name] / "metrics.jsonl", ctx.dir / f"{name}.metrics.jsonl")
    r["resume"] = resume_verdict(outputs, stop)
    top1 = r["runs"]["bf16"].get("top1")
    r["accuracy"] = dict(
        gpu_bf16_top1=top1,
        cpu_demo_top1=CPU_DEMO_TOP1,
        difference=None if top1 is None else round(top1 - CPU_DEMO_TOP1, 2),
    )
    ctx.save()
    expected = {name: 75 if name == "resume_stopped" else 0 for name in runs}
    ok = all(started[name].rc == expected[name] for name in runs) and resumed is not None and resumed.rc == 0
    return 0 if ok and r["resume"]["exact"] is not False else 1


def train_command(data: Path, output: Path, flags: Iterable[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dali_ba.train",
        "--recipe",
        "pipelines/demo.toml",
        "--train",
        str(data / "train"),
        "--val",
        str(data / "val"),
        "--output",
        str(output),
        *flags,
    ]


class Training:
    """A training started in the background, its output to ``log``."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.start, self.rc, self.seconds, self.finished = time.perf_counter(), None, None, False
        with open(log, "ab") as out:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=child_env())

    def wait(self, deadline: float) -> int | None:
        """Its exit code, or None after killing it at ``deadline`` (time.time())."""
        if self.finished:
            return self.rc
        try:
            self.rc = self.process.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            kill_tree(self.process.pid)
            self.process.wait()
        self.seconds, self.finished = round(time.perf_counter() - self.start, 1), True
        return self.rc


def records(output: Path, kind: str) -> list[dict]:
    try:
        lines = (output / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return [r for r in parsed if r.get("kind") == kind]


def stop_mid_epoch(training: Training, output: Path, ctx: Ctx) -> dict:
    """SIGUSR1 once the run has logged a step; the trainer finishes the step, checkpoints, exits 75."""
    while time.time() < ctx.deadline - 10 and training.process.poll() is None and not records(output, "step"):
        time.sleep(0.01)
    if training.process.poll() is not None:
        return {"rc": training.wait(ctx.deadline), "error": "the run ended before it could be stopped"}
    os.kill(training.process.pid, signal.SIGUSR1)
    rc = training.wait(ctx.deadline - 5)
    stops, start = records(output, "stop"), records(output, "start")
    steps_per_epoch = start[0].get("steps_per_epoch") if start else None
    step = stops[0]["step"] if stops else None
    return dict(
        rc=rc,
        step=step,
        steps_per_epoch=steps_per_epoch,
        mid_epoch=None if not (step and steps_per_epoch) else step % steps_per_epoch != 0,
    )


def run_summary(output: Path) -> dict:
    """What a run's records say: device, decoder, engine, accuracy, throughput, parameter digest."""
    start, summary = records(output, "start"), records(output, "summary")
    keys = ("device", "decoder", "engine", "engine_backend", "steps_per_epoch")
    out = {key: start[0].get(key) for key in keys} if start else {}
    if summary:
        s = summary[-1]
        out.update(
            {
                key: s.get(key)
                for key in ("top1", "top5", "steps_per_s", "images_per_s", "wall_time", "params_identical")
            },
            digest=json.dumps(s.get("param_digests")),
        )
    return out


def resume_verdict(outputs: dict[str, Path], stop: dict) -> dict:
    """Stopped + resumed against uninterrupted: bit-identical parameters, or how far apart (and how far
    apart two uninterrupted runs are: GPU kernels need not be deterministic)."""
    digests = {
        name: run_summary(outputs[name]).get("digest")
        for name in ("resume_reference", "resume_reference_again", "resume_stopped")
    }
    verdict = dict(stop=stop, deterministic=None, exact=None)
    if None in digests.values():
        return dict(verdict, note="a run has no summary")
    verdict["deterministic"] = digests["resume_reference"] == digests["resume_reference_again"]
    verdict["exact"] = digests["resume_stopped"] == digests["resume_reference"]
    if not verdict["exact"]:
        verdict["max_abs_difference_resumed"] = max_difference(outputs["resume_reference"], outputs["resume_stopped"])
        verdict["max_abs_difference_run_to_run"] = max_difference(
            outputs["resume_reference"], outputs["resume_reference_again"]
        )
        if not verdict["deterministic"]:
            verdict["exact"] = None  # undecidable bit for bit: training itself is not deterministic here
    return verdict


def max_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two runs' final parameters and buffers (model.pt)."""
    import torch

    left, right = (torch.load(p / "model.pt", map_location="cpu", weights_only=True) for p in (a, b))
    return max(float((left[k].double() - right[k].double()).abs().max()) for k in left if left[k].numel())


# --- 7-9. Figure 5, profile views, Figure 5 compiled --------------------------------------------------


def figure5_recipe(ctx: Ctx) -> Path:
    """The recipe of Figure 5's runs: ResNet-50 (smoke: ResNet-20), bf16, channels_last, B per GPU, on
    the ImageNet-like JPEGs; M comes from the command line."""
    s, train = ctx.sizes, ensure_images(ctx)
    path = ctx.dir / "figure5.toml"
    path.write_text(
        f'[data]\ntrain = "{train}"\nval = "{train}"\nbatch_size = {s.batch}\nview_size = {s.view_size}\n'
        f'dali_threads = {max(1, s.workers // 2)}\ndecoder = "auto"\n\n'
        f'[model]\narch = "{s.arch}"\namp = "bf16"\nchannels_last = true\n\n[run]\nseed = 0\n'
    )
    return path


def profile_env() -> dict:
    # M = 10 puts 640 ResNet-50 views through one step: less fragmentation where memory is tight.
    return {**child_env(), "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def step_figure5(ctx: Ctx) -> int:
    """dali-ba profile step at each M: steps/s, the phases of a step, and the data stall
    against the same steps fed from batches in memory."""
    recipe, s = figure5_recipe(ctx), ctx.sizes
    ctx.result.update(recipe=recipe.read_text(), runs={}, results=[], share_rule=M_SHARE_RULE)
    for position, m in enumerate(s.views):
        out = ctx.dir / f"m{m}"
        command = [
            sys.executable,
            "-m",
            "dali_ba",
            "profile",
            "step",
            "--recipe",
            str(recipe),
            "--views",
            str(m),
            "--steps",
            str(s.steps),
            "--warmup",
            str(s.warmup),
            "--cache-batches",
            str(s.cache),
            "--out",
            str(out),
        ]
        limit = ctx.left() * m_share(s.views[position:])
        rc, seconds = run_logged(command, ctx.dir / f"m{m}.log", limit, profile_env())
        ctx.result["runs"][m] = dict(rc=rc, seconds=round(seconds, 1), limit_s=round(limit, 1))
        profile = read_json(out / "profile_step.json")  # a run killed at its limit leaves its finished windows
        if profile:
            ctx.result["results"].append(figure5_row(profile))
        ctx.save()
    return 0 if all(run["rc"] == 0 for run in ctx.result["runs"].values()) else 1


# One profile step run's start-up (torch, DALI, the model, the first steps' autotuning: ~10 s estimated on
# an H100/H200, unmeasured) in views' worth of its steps (ResNet-50, B = 64: ~0.2 s of the 114 steps' time
# per view, estimated): M = 1, 4, 10 estimated at ~13, ~19, ~33 s, in proportion to M + 5.
M_SHARE_COST = 30  # each M's process start (torch, CUDA, DALI, cuDNN's autotuning): about 25 s on the H200
M_SHARE_RULE = (
    f"each M's profile step gets the share (M + {M_SHARE_COST}) / (the sum of that over the Ms still to run) "
    "of the time left: M = 10 its own share, not what M = 1 and 4 left; a run killed at its limit leaves "
    "the windows it finished (complete: false)"
)


def m_share(views: list[int] | tuple[int, ...]) -> float:
    """The share of the time left for the first of ``views`` (the Ms still to run): :data:`M_SHARE_RULE`."""
    weights = [m + M_SHARE_COST for m in views]
    return weights[0] / sum(weights)


def figure5_row(p: dict) -> dict:
    """One M's row from its profile_step.json; a profile cut short (``complete`` false) gives what its
    finished windows measured and None for the rest (the data stall needs all three)."""
    fed, memory, pipeline = p.get("loader", {}), p.get("memory", {}), p.get("pipeline", {})
    return dict(
        views=p["views"],
        complete=p.get("complete", True),  # profiles from before partial writes were always complete
        windows=p.get("windows", ["pipeline", "loader", "memory"]),
        arch=p["arch"],
        amp=p["amp"],
        device=p["device"],
        decoder=p["decoder"],
        steps_per_s=p.get("steps_per_s"),
        images_per_s=p.get("images_per_s"),
        views_per_s=p.get("views_per_s"),
        memory_steps_per_s=memory.get("steps_per_s"),
        memory_images_per_s=memory.get("images_per_s"),
        data_stall=p.get("data_stall"),
        data_stall_raw=p.get("data_stall_raw"),
        data_wait_share=p.get("data_wait_share"),
        loader_alone_samples_per_s=pipeline.get("samples_per_s"),
        phases_ms={k: 1e3 * v for k, v in fed.get("phases", {}).items()},
        memory_phases_ms={k: 1e3 * v for k, v in memory.get("phases", {}).items()},
        syncs_per_step=p.get("syncs_per_step"),  # the most host syncs in one timed step (CUDA only)
        sync_sites=[site for report in p.get("host_syncs", []) for site in report.get("sites", {})],
    )


def steps_seconds(p: dict) -> float | None:
    """The seconds a complete step profile spent in its three windows' steps, warm-up included (each at its
    window's step time); None for a profile cut short."""
    if not p.get("complete", True) or not all(k in p for k in ("pipeline", "loader", "memory")):
        return None
    per_window = p["warmup"] + p["steps"]
    return per_window * (p["pipeline"]["batch_time"] + p["loader"]["step_time"] + p["memory"]["step_time"])


def step_views(ctx: Ctx) -> int:
    """dali-ba profile views over the same M (shorter): the sweep in one process, and the free views."""
    recipe, s = figure5_recipe(ctx), ctx.sizes
    out = ctx.dir / "views"
    command = [
        sys.executable,
        "-m",
        "dali_ba",
        "profile",
        "views",
        "--recipe",
        str(recipe),
        "--views",
        ",".join(map(str, s.views)),
        "--steps",
        str(s.views_steps),
        "--warmup",
        str(min(s.warmup, 5)),
        "--cache-batches",
        str(s.cache),
        "--tolerance",
        "0.1",
        "--out",
        str(out),
    ]
    rc, seconds = run_logged(command, ctx.dir / "views.log", ctx.left(), profile_env())
    profile = read_json(out / "profile_views.json") or {}
    rows = [
        dict(
            views=r["views"],
            steps_per_s=r["steps_per_s"],
            images_per_s=r["samples_per_s"],
            views_per_s=r["views_per_s"],
            memory_images_per_s=profile["per_rank_batch"] / r["memory_step_time"],
            data_stall=r["data_stall"],
            step_time_ratio=r["step_time_ratio"],
            # the training thread's time in the reader's source per batch (issue 37: off that thread)
            source_ms=None if r.get("source_callback_time") is None else 1e3 * r["source_callback_time"],
            phases_ms={k: 1e3 * v for k, v in r.get("phases", {}).items()},
        )
        for r in profile.get("results", [])
    ]
    ctx.result.update(
        rc=rc,
        seconds=round(seconds, 1),
        complete=profile.get("complete", bool(profile)),  # false: killed at its limit, the Ms it finished
        measured=profile.get("measured", [r["views"] for r in rows]),
        free_views=profile.get("free_views"),
        tolerance=profile.get("tolerance"),
        results=rows,
    )
    ctx.save()
    return 0 if rc == 0 else 1


def step_compile(ctx: Ctx) -> int:
    """Figure 5 at M = ``compile_views`` with ``--compile`` (torch.compile, [model] compile), ``compile_steps``
    steps after ``compile_warmup`` per window: steps/s and data stall once compiled, against figure5's run at
    that M without it, and the compile time apart (:data:`COMPILE_RULE`). A required step with a fixed
    share of the budget (a cold inductor compile of ResNet-50 takes a minute or more); without the flag in
    this checkout it says so and measures nothing."""
    s = ctx.sizes
    m = s.compile_views
    ctx.result.update(views=m, arch=s.arch, steps=s.compile_steps, warmup=s.compile_warmup, runs={})
    if not recipe_flag("--compile"):
        ctx.result["skipped"] = "--compile is not in this checkout's recipe ([model] compile): nothing measured"
        ctx.save()
        return 0
    recipe = figure5_recipe(ctx)
    out = ctx.dir / f"m{m}"
    command = [
        sys.executable,
        "-m",
        "dali_ba",
        "profile",
        "step",
        "--recipe",
        str(recipe),
        "--views",
        str(m),
        "--compile",
        "--steps",
        str(s.compile_steps),
        "--warmup",
        str(s.compile_warmup),
        "--cache-batches",
        str(min(s.cache, s.compile_steps)),
        "--out",
        str(out),
    ]
    env = profile_env()
    if not ctx.smoke:  # a cold cache, always: the compile time measured is a first run's on any machine
        env["TORCHINDUCTOR_CACHE_DIR"] = str(ctx.work / "inductor_cache")
    ctx.result["inductor_cache"] = "cold (a new folder)" if not ctx.smoke else "this machine's (warm after a first run)"
    rc, seconds = run_logged(command, ctx.dir / f"m{m}.log", ctx.left(), env)
    profile = read_json(out / "profile_step.json")  # a run killed at its limit leaves its finished windows
    compiled = figure5_row(profile) if profile else None
    if profile and compiled:
        compiled.update({key: value for key, value in profile.items() if "compile" in key})  # what profile says of it
    figure5 = read_json(ctx.dir.parent / "figure5" / "result.json") or {}
    plain_run = figure5.get("runs", {}).get(str(m))  # JSON keys are strings
    plain = next((row for row in figure5.get("results", []) if row.get("views") == m), None)
    plain_profile = read_json(ctx.dir.parent / "figure5" / f"m{m}" / "profile_step.json") or {}
    ctx.result.update(
        rc=rc,
        seconds=round(seconds, 1),
        compiled=compiled,
        uncompiled=plain,
        uncompiled_seconds=plain_run and plain_run.get("seconds"),
        compile_rule=COMPILE_RULE,
    )
    ctx.result["compile_s"] = compile_seconds(seconds, profile, plain_run, plain_profile) if rc == 0 else None
    if ctx.result["compile_s"] is None:
        ctx.result["compile_note"] = "not measured: needs both this run and figure5's run at this M to have finished"
    if compiled and plain and compiled.get("steps_per_s") and plain.get("steps_per_s"):
        ctx.result["speedup"] = compiled["steps_per_s"] / plain["steps_per_s"]
    ctx.save()
    return 0 if rc == 0 else 1


COMPILE_RULE = (
    "compile_s: the compiled run's wall time less its steps (each window's warm-up and timed steps at that "
    "window's step time) and less the start-up of figure5's uncompiled run at this M (its wall time less its "
    "steps, likewise): the extra time of the compiled run's first steps. The two runs time different numbers "
    "of steps, so their wall times are not compared directly"
)


def compile_seconds(seconds: float, compiled: dict | None, plain_run: dict | None, plain: dict) -> float | None:
    """:data:`COMPILE_RULE`; None unless both runs finished."""
    ours, theirs = steps_seconds(compiled or {}), steps_seconds(plain)
    if ours is None or theirs is None or not plain_run or plain_run.get("rc") != 0:
        return None
    return round(seconds - ours - (plain_run["seconds"] - theirs), 1)
