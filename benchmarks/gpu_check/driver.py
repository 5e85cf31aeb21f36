"""The GPU check: one command runs everything a lent GPU machine should show, under a time limit.

    python3 -m benchmarks.gpu_check --out DIR --part 1   # on the GPU machine: one call of at most 380 s,
    python3 -m benchmarks.gpu_check --out DIR2 --part 2  # then the other, at once on the same machine
    python3 -m benchmarks.gpu_check --out DIR --smoke    # the same steps on the CPU at tiny sizes
    make gpu-check OUT=DIR [SMOKE=1]                     # the same, through make

A GPU is lent rarely and briefly, so the check must work the first time: the smoke run (part of
``make test``) goes through every step on the CPU first. Each step of :data:`STEPS` runs as its own
process (``python -m benchmarks.gpu_check.steps STEP``) under its own time limit; a failing or
timed-out step never stops the next, and the whole run keeps inside ``--budget`` seconds (by default
the sum of its steps' limits: at most :data:`PART_BUDGET_S` for each part); the optional steps
(``views``, ``augment``) run last, each skipped with a note where too little is left. After every step the three
files in ``--out`` are rewritten, so a run killed from outside still leaves what it had:

- ``gpu_check.json`` — the machine, every step's status, time and result, the targets met or missed;
- ``gpu_check.md`` — the same as Markdown tables;
- ``details.tar.gz`` — every step's log and raw outputs (metrics, profiles, test report).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.gpu_check.processes import child_env, run_logged
from benchmarks.gpu_check.report import targets, write_report

PROG = "python -m benchmarks.gpu_check"
STEPS_COMMAND = (sys.executable, "-m", "benchmarks.gpu_check.steps")  # + STEP and its flags, from the repository root
SMOKE_NOTE = (
    "SMOKE RUN on the CPU at tiny sizes: it proves the script, its numbers are not GPU numbers "
    "and its targets say nothing about a GPU"
)


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    budget_s: float  # time limit on the GPU machine: a part's steps' limits add up to PART_BUDGET_S at most
    smoke_budget_s: float  # time limit on the CPU smoke run: only a guard against hangs, ample for 2 shared cores
    needs_s: int = 0  # an optional step (run last in its part on what the others left): skipped, with a
    # note, when less than this is left
    part: int = 1  # the device call it runs in (--part)


# The GPU limits come from the first runs on an H200 (benchmarks/results/gpu/2026-12-04-h200-1 and -2),
# where the first estimates (470 s in all) cut seven of nine steps: env took 31.5 s, the doctor 12-16 s,
# the demo 37 s, figure5 28-35 s per M (M = 1, first, pays the cold machine), compile 96 s and more; each
# limit is that with a margin, and a step that ends early leaves its time to the later ones. The steps are
# in two parts, each one device call (a call runs at most 10 minutes; the two, the machine's start and
# DALI's three parts fit in a task's 15 minutes of device time): ``--part 1`` right after DALI's last
# part, ``--part 2`` at once after it, on the same warm machine. An optional step (views, augment) runs
# last in its part on what the others left.
STEPS = (
    Step("env", "Environment: GPU, driver, versions, DALI's hardware JPEG decoder", 45, 120, part=1),
    Step("doctor", "python -m dali_ba.doctor on this machine (its GPU paths)", 25, 90, part=1),
    Step("tests", "Test suite's GPU-relevant files on CUDA, a pytest process and a limit each", 120, 240, part=1),
    Step(
        "demo",
        "Demo recipe: bf16; fp16 + --chunks 2; --engine torch; accuracy; exact mid-epoch resume (--deterministic)",
        55,
        240,
        part=1,
    ),
    Step(
        "loader",
        "Loader alone, M = 1, 4, 10: dali-ba vs torchvision (16 workers), torchvision on the GPU, "
        "DALI decode alone; the mixed decoder at three hw_decoder_load; two facts of the GPU path",
        135,
        180,
        part=1,
    ),
    Step("figure5", "Figure 5: ResNet-50, bf16, channels_last, B = 64, M = 1, 4, 10 (profile step)", 120, 240, part=2),
    Step("compile", "Figure 5 at M = 4 with --compile: compile time apart, steps/s compiled", 110, 420, part=2),
    Step("views", "dali-ba profile views, M = 1, 4, 10", 90, 180, needs_s=25, part=2),
    Step(
        "augment",
        "Auto-augment graphs (randaugment, trivial), M = 4, 10, 1: graph build time, views/s",
        55,
        180,
        needs_s=20,
        part=2,
    ),
)
PARTS = (1, 2)
PART_BUDGET_S = 380  # one part's steps: one device call, under its 10 minutes with DALI's unpacking
DEVICE_TIME_S = 15 * 60  # a task's device time: the machine's start, DALI's parts and the two calls


# --- running a step ---------------------------------------------------------------------------------


def run_step(step: Step, details: Path, work: Path, smoke: bool, remaining: float) -> dict:
    """One step in its own process under min(its budget, the time left); its record for the report."""
    folder = details / step.name
    folder.mkdir(parents=True, exist_ok=True)
    budget = step.smoke_budget_s if smoke else step.budget_s
    limit = min(budget, remaining)
    record = dict(
        name=step.name, title=step.title, budget_s=budget, limit_s=round(limit, 1), optional=bool(step.needs_s)
    )
    if limit < max(2, step.needs_s):  # not even time to start Python and import torch, or to do what it is for
        note = (
            f"not enough time left: {max(0.0, remaining):.0f} s of the {step.needs_s} s it needs"
            if step.needs_s
            else "no time left"
        )
        print(f"gpu_check: {step.name}: skipped ({note})", flush=True)
        return dict(record, status=f"skipped ({note})", seconds=0.0, result={})
    cmd = [*STEPS_COMMAND, step.name, "--dir", str(folder), "--work", str(work), "--limit", str(limit)]
    print(f"gpu_check: {step.name}: {step.title} (limit {limit:.0f} s)", flush=True)
    rc, seconds = run_logged(cmd + (["--smoke"] if smoke else []), folder / "log.txt", limit, child_env())
    result_file = folder / "result.json"
    try:
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    except json.JSONDecodeError as exc:  # killed while writing it
        result = {"unreadable_result": str(exc)}
    status = "ok" if rc == 0 else "timed out" if rc is None else f"failed (rc {rc})"
    print(f"gpu_check: {step.name}: {status} in {seconds:.1f} s", flush=True)
    return dict(record, status=status, rc=rc, seconds=round(seconds, 1), result=result)


def not_ok(record: dict) -> bool:
    """A step that failed, timed out or was skipped; an optional step skipped for want of time is not."""
    return record["status"] != "ok" and not (record.get("optional") and record["status"].startswith("skipped"))


# --- the machine (the targets and the report: report.py) ----------------------------------------------


def machine() -> dict:
    """What the driver can say without torch (the env step adds the GPU, driver and library versions)."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    memory = next((int(line.split()[1]) // 1024**2 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return dict(
        cpu=cpu,
        cores=len(os.sched_getaffinity(0)),
        memory_gib=memory,
        os=platform.platform(),
        python=platform.python_version(),
        load_average=os.getloadavg(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="gpu_check.json, gpu_check.md, details.tar.gz land here"
    )
    parser.add_argument("--smoke", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch folder (data, runs, checkpoints), emptied first and kept (default: a temporary "
        "folder, removed at the end)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run (default: the sum of its steps' limits, on the GPU or the smoke run's)",
    )
    parser.add_argument("--steps", default=None, help="comma-separated steps to run (default: all, or --part's)")
    parser.add_argument(
        "--part",
        type=int,
        choices=PARTS,
        default=None,
        help="the steps of one device call: 1 (env, doctor, tests, demo, loader), then 2 (figure5, compile, "
        "views, augment) on the same machine",
    )
    parser.add_argument(
        "--limits",
        default="",
        help="STEP=SECONDS,...: other limits on the GPU for a rerun of some steps (a first run's steps cut at "
        "their limits)",
    )
    args = parser.parse_args(argv)
    args.command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
    names = args.steps.split(",") if args.steps else [s.name for s in STEPS if args.part in (None, s.part)]
    chosen = [s for s in STEPS if s.name in names]
    unknown = set(names) - {s.name for s in STEPS}
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; known: {', '.join(s.name for s in STEPS)}")
    try:
        limits = {
            name: float(seconds) for name, seconds in (item.split("=") for item in args.limits.split(",") if item)
        }
    except ValueError:
        parser.error(f"--limits {args.limits!r}: expected STEP=SECONDS,..., e.g. figure5=150")
    if set(limits) - {s.name for s in chosen}:
        parser.error(f"--limits names steps not run: {sorted(set(limits) - {s.name for s in chosen})}")
    chosen = [
        replace(s, budget_s=limits[s.name], smoke_budget_s=limits[s.name]) if s.name in limits else s for s in chosen
    ]
    budget = args.budget or sum(s.smoke_budget_s if args.smoke else s.budget_s for s in chosen)
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    empty(work)
    details = work / "details"
    details.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        return run_all(args, chosen, budget, work, details)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def empty(work: Path) -> None:
    """Empties the scratch folder, keeping the ImageNet-like JPEGs that part 1 made for part 2 (made again
    where their sizes differ: ``context.ensure_images``)."""
    work.mkdir(parents=True, exist_ok=True)
    for entry in work.iterdir():
        if entry.name != "imagenet_like":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def run_all(args: argparse.Namespace, chosen: list[Step], budget: float, work: Path, details: Path) -> int:
    """Every chosen step in turn, the report rewritten after each; 0 when all of them were ok."""
    started = time.perf_counter()
    report = dict(
        kind="gpu_check",
        smoke=args.smoke,
        note=SMOKE_NOTE if args.smoke else "GPU run",
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        budget_s=budget,
        command=args.command,
        machine=machine(),
        steps=[],
        targets=[],
        wall_s=0.0,
    )
    for step in chosen:
        record = run_step(step, details, work, args.smoke, budget - (time.perf_counter() - started))
        report["steps"].append(record)
        if step.name == "env":
            report["machine"].update(record["result"].get("machine", {}))
        report["targets"] = targets({s["name"]: s for s in report["steps"]})
        report["wall_s"] = round(time.perf_counter() - started, 1)
        write_report(args.out, report, details)
    failed = [s["name"] for s in report["steps"] if not_ok(s)]
    print(
        f"gpu_check: {len(chosen) - len(failed)} of {len(chosen)} steps ok"
        + (f" (not ok: {', '.join(failed)})" if failed else "")
        + f" in {report['wall_s']:.0f} s; "
        f"wrote {args.out / 'gpu_check.json'}, gpu_check.md, details.tar.gz",
        flush=True,
    )
    return 1 if failed else 0
