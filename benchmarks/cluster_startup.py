"""Start-up at cluster scale: ``sbatch slurm/resnet50_ba.sh`` on the 1,281,167-file list across 4 simulated
nodes x 2 ranks (8 ranks) of the SLURM test cluster (tests/slurm_cluster.py, loopback only), and the
doctor and the stall watch at 8 ranks.

    python -m benchmarks.cluster_startup [--root /tmp/dali-ba-startup] [--out benchmarks/results]
                                         [--launchers horovod,torch,torchrun] [--stall-timeout 30]

The data: the ImageNet-shaped tree of hard links and its ``<path> <label>`` list that
``python -m benchmarks.startup`` makes (made here too when missing). Each training job is the CPU
version of the template (the demo recipe, resnet20, 32 px views, B=32 over all ranks, M=2,
``--max-steps 3``, one DALI and torch thread per rank), submitted with ``--nodes=4 --ntasks-per-node=2``,
run twice: once timed, each rank under ``/usr/bin/time`` (its peak RSS), once with each rank under
``strace -f --seccomp-bpf`` (its stat, getdents and open calls on the data set), both through the
template's ``PYTHON`` (a wrapper script). Seconds to the first step: rank 0's own start-up record (per
phase, from its process's start) and, from this side, from ``sbatch`` to the record's appearance.

Then ``python -m dali_ba.doctor`` on the 8 ranks (``srun --mpi=pmix``), and a long run with a short
``--stall-timeout`` whose last rank (node n4) gets SIGSTOP after its second step: the job must end
with exit 76 and the stall line naming that rank and node. The cluster is stopped at the end whatever
happened. Writes <out>/cluster_startup.json and <out>/cluster_startup.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.startup import SOURCES, TRACED, make_sources, make_tree, make_val, trace_counts
from dali_ba.machine import describe_machine, machine_line

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m benchmarks.cluster_startup"
NODES, PER_NODE = 4, 2
RANKS = NODES * PER_NODE
SIZE = 1_281_167
CPU = ["--gpus-per-node=0", "--cpus-per-task=1"]
# The CPU version of the templates (as tests/slurm_jobs.py's SMALL): tiny model and views, one thread each.
SMALL = "--arch resnet20 --view-size 32 --val-resize 36 --val-crop 32 --dali-threads 1 --torch-threads 1 --log-every 1"
BATCH, VIEWS, MAX_STEPS = 32, 2, 3
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")
# The template's PYTHON: lib.sh asks it for its version (passed through); each rank runs under
# /usr/bin/time (peak RSS, KiB) or strace (its calls), its rank from torchrun's RANK or srun's SLURM_PROCID.
RANK_WRAPPER = """#!/bin/sh
[ "$1" = -m ] || exec "$CS_PYTHON" "$@"
rank=${RANK:-${SLURM_PROCID:-0}}
if [ -n "$CS_TRACE" ]; then
  exec strace -f -qq -y --seccomp-bpf -e trace=TRACED -o "$CS_DIR/trace-$rank" "$CS_PYTHON" "$@"
fi
exec /usr/bin/time -f %M -o "$CS_DIR/rss-$rank" "$CS_PYTHON" "$@"
""".replace("TRACED", ",".join(TRACED))


def say(text: str) -> None:
    print(f"{PROG}: {text}", flush=True)


def load_cluster_module() -> Any:
    """tests/slurm_cluster.py (the tests' folder is no package)."""
    spec = importlib.util.spec_from_file_location("slurm_cluster", REPO / "tests" / "slurm_cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["slurm_cluster"] = module
    spec.loader.exec_module(module)
    return module


def read_records(folder: Path, kind: str | None = None) -> list[dict]:
    """metrics.jsonl's whole lines (one being written is not read)."""
    path = folder / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    rows = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def job_output(cluster, name: str, job_id: str) -> str:
    path = cluster.root / f"{name}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def base_env(cluster, data: dict[str, Path]) -> dict[str, str]:
    """What every job gets (as tests/slurm_jobs.py's job_environment): the data, this Python, outputs
    under the cluster's folder."""
    return {
        "DATA": str(data["train"]),
        "VAL": str(data["val"]),
        "OUTPUT_ROOT": str(cluster.root / "runs"),
        "PYTHON": sys.executable,
        "DALI_BA_ROOT": str(REPO),
        "OMPI_MCA_mpi_yield_when_idle": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "BATCH": str(BATCH),
        "VIEWS": str(VIEWS),
        "RECIPE": "pipelines/demo.toml",
    }


def watch(cluster, job_id: str, folder: Path, timeout: float, submitted: float) -> dict[str, float | None]:
    """Poll the job until it has finished: seconds from sbatch to its batch script's start (job.txt), to
    rank 0's start record and to its start-up record (the end of the first step), and to the job's end."""
    seen: dict[str, float | None] = {"batch_started": None, "start_record": None, "first_step": None}
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic() - submitted
        if seen["batch_started"] is None and (folder / "job.txt").exists():
            seen["batch_started"] = now
        if seen["first_step"] is None:
            kinds = {r["kind"] for r in read_records(folder)}
            if seen["start_record"] is None and "start" in kinds:
                seen["start_record"] = now
            if "startup" in kinds:
                seen["first_step"] = now
        tasks = cluster.job(job_id)
        if tasks and all(t["JobState"] in cluster_module.FINISHED for t in tasks):
            seen["job_end"] = time.monotonic() - submitted
            return seen
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=cluster.env, capture_output=True, timeout=30)
            raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s (cancelled): {tasks}")
        time.sleep(0.5)


def train_job(cluster, env: dict[str, str], work: Path, label: str, engine: str, trace: bool, timeout: float) -> dict:
    """One sbatch of slurm/resnet50_ba.sh on 4 nodes x 2 ranks; what it measured."""
    case = work / label
    case.mkdir(parents=True)
    wrapper = case / "rank.sh"
    wrapper.write_text(RANK_WRAPPER)
    wrapper.chmod(0o755)
    job_env = {
        **env,
        "PYTHON": str(wrapper),
        "CS_PYTHON": sys.executable,
        "CS_DIR": str(case),
        "CS_TRACE": "1" if trace else "",
        "ENGINE": engine,
        "EPOCHS": "1",
        "CHECKPOINT_EVERY": "",
        "NO_REQUEUE": "1",
        "EXTRA_ARGS": f"{SMALL} --max-steps {MAX_STEPS}",
    }
    say(f"{label}: sbatch slurm/resnet50_ba.sh --nodes={NODES} --ntasks-per-node={PER_NODE} ({engine})")
    submitted = time.monotonic()
    job_id = cluster.sbatch(
        f"--nodes={NODES}",
        f"--ntasks-per-node={PER_NODE}",
        *CPU,
        f"--output={cluster.root}/%x-%j.out",
        "slurm/resnet50_ba.sh",
        env=job_env,
        cwd=REPO,
    )
    folder = cluster.root / "runs" / f"resnet50_ba-{job_id}"
    seen = watch(cluster, job_id, folder, timeout, submitted)
    (task,) = cluster.job(job_id)
    result: dict[str, Any] = {
        "label": label,
        "engine": engine,
        "launcher": "srun --mpi=pmix" if engine == "horovod" else "srun --mpi=none",
        "traced": trace,
        "job_id": job_id,
        "state": task["JobState"],
        "exit": task["ExitCode"],
        "seconds_from_sbatch": seen,
    }
    result.update(run_facts(folder))
    if trace:
        result["calls"] = [
            trace_counts(case / f"trace-{r}", DATA_ROOT) if (case / f"trace-{r}").exists() else None
            for r in range(RANKS)
        ]
    else:
        result["rss_mb"] = [
            int((case / f"rss-{r}").read_text().split()[-1]) / 1024 if (case / f"rss-{r}").exists() else None
            for r in range(RANKS)
        ]
    if (task["JobState"], task["ExitCode"]) != ("COMPLETED", "0:0"):
        result["output_tail"] = job_output(cluster, "resnet50_ba", job_id)[-3000:]
    return result


def run_facts(folder: Path) -> dict:
    """Rank 0's start-up per phase, the index's record, the ranks' hosts, steps done, from the job folder."""
    facts: dict[str, Any] = {}
    start = read_records(folder, "start")
    startup = read_records(folder, "startup")
    summary = read_records(folder, "summary")
    if start:
        facts["ranks"] = start[0]["ranks"]
        facts["index"] = start[0].get("index")
    if startup:
        facts["startup_s"] = startup[0]["startup_s"]
    if summary:
        facts["steps"] = summary[0].get("steps")
        facts["params_identical"] = summary[0].get("params_identical")
    environment = folder / "environment.json"
    if environment.exists():
        per_rank = json.loads(environment.read_text()).get("per_rank", [])
        facts["hosts"] = [p.get("host") for p in per_rank]
        roles = [p.get("index") or {} for p in per_rank]
        facts["index_roles"] = [r.get("role") for r in roles]
        facts["index_same_on_every_rank"] = len({r.get("sha256") for r in roles}) == 1 and bool(roles)
    return facts


def torchrun_job(cluster, env: dict[str, str], work: Path, data: dict[str, Path], timeout: float) -> dict:
    """slurm/README.md's torchrun launch line: one torchrun agent per node (srun), 2 workers each, meeting
    at the first node (c10d); each worker under /usr/bin/time."""
    case = work / "torchrun"
    case.mkdir(parents=True)
    wrapper = case / "rank.sh"
    wrapper.write_text(RANK_WRAPPER)
    wrapper.chmod(0o755)
    output = cluster.root / "runs" / "torchrun"
    script = case / "torchrun.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=torchrun --nodes={NODES} --ntasks-per-node=1 --cpus-per-task={PER_NODE} --gpus-per-node=0
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
srun --kill-on-bad-exit=1 {sys.executable} -m torch.distributed.run --nnodes {NODES} --nproc-per-node {PER_NODE} \\
    --rdzv-backend c10d --rdzv-endpoint "$head:$((29400 + SLURM_JOB_ID % 1000))" --rdzv-id "$SLURM_JOB_ID" \\
    --no-python sh {wrapper} -m dali_ba.train --recipe pipelines/demo.toml --train {data["train"]} \\
    --val {data["val"]} --output {output} --epochs 1 --max-steps {MAX_STEPS} --batch-size {BATCH} \\
    --views {VIEWS} {SMALL}
""")
    say(f"torchrun: sbatch of {NODES} torchrun agents x {PER_NODE} workers")
    submitted = time.monotonic()
    job_id = cluster.sbatch(
        f"--output={cluster.root}/torchrun-%j.out",
        str(script),
        env={**env, "CS_PYTHON": sys.executable, "CS_DIR": str(case), "CS_TRACE": ""},
        cwd=REPO,
    )
    seen = watch(cluster, job_id, output, timeout, submitted)
    (task,) = cluster.job(job_id)
    result: dict[str, Any] = {
        "label": "torchrun",
        "engine": "torch",
        "launcher": "srun + torchrun (c10d)",
        "traced": False,
        "job_id": job_id,
        "state": task["JobState"],
        "exit": task["ExitCode"],
        "seconds_from_sbatch": seen,
        **run_facts(output),
        "rss_mb": [
            int((case / f"rss-{r}").read_text().split()[-1]) / 1024 if (case / f"rss-{r}").exists() else None
            for r in range(RANKS)
        ],
    }
    if (task["JobState"], task["ExitCode"]) != ("COMPLETED", "0:0"):
        result["output_tail"] = job_output(cluster, "torchrun", job_id)[-3000:]
    return result


def doctor_job(cluster, env: dict[str, str], data: dict[str, Path], timeout: float) -> dict:
    """``python -m dali_ba.doctor`` on 4 nodes x 2 ranks (srun --mpi=pmix): does it answer, with one row per
    node and every rank counted?"""
    report_path = cluster.root / "doctor.json"
    say("doctor: sbatch --wrap 'srun --mpi=pmix python -m dali_ba.doctor' on 8 ranks")
    submitted = time.monotonic()
    job_id = cluster.sbatch(
        f"--nodes={NODES}",
        f"--ntasks-per-node={PER_NODE}",
        *CPU,
        "--job-name=doctor",
        f"--output={cluster.root}/doctor-%j.out",
        "--wrap",
        f"srun --mpi=pmix {sys.executable} -m dali_ba.doctor --recipe pipelines/demo.toml --train {data['train']} "
        f"--val {data['val']} --output {cluster.root}/doctor/run --json {report_path} --dali-threads 1",
        env=env,
        cwd=REPO,
    )
    (task,) = cluster.wait(job_id, timeout=timeout)
    seconds = time.monotonic() - submitted
    log = job_output(cluster, "doctor", job_id)
    result: dict[str, Any] = {
        "job_id": job_id,
        "state": task["JobState"],
        "exit": task["ExitCode"],
        "seconds_from_sbatch": seconds,
    }
    if report_path.exists():
        report = json.loads(report_path.read_text())
        result.update(
            ok=report.get("ok"),
            ranks=report.get("ranks"),
            nodes=sorted(report.get("nodes", {})),
            table=report.get("table"),
            problems=[
                {k: p.get(k) for k in ("level", "check", "nodes", "ranks", "text")} for p in report.get("problems", [])
            ],
        )
    result["answered"] = result.get("ranks") == RANKS and result.get("nodes") == [f"n{i}" for i in range(1, 5)]
    if not result["answered"] or task["ExitCode"] != "0:0":
        result["output_tail"] = log[-3000:]
    return result


def rank_processes(cluster, job_id: str) -> dict[int, tuple[int, str]]:
    """The job's training processes: SLURM task number (rank) -> (pid, node); of a task's processes whose
    command line names dali_ba.train, the one whose parent is not one of them."""
    found = cluster.task_processes(job_id, "dali_ba.train")
    ranks: dict[int, tuple[int, str]] = {}
    for pid, node in found.items():
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
            if parent in found:
                continue
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next(int(v.split(b"=", 1)[1]) for v in environ if v.startswith(b"SLURM_PROCID="))
            ranks[rank] = (pid, node)
    return ranks


def stall_job(cluster, env: dict[str, str], stall_timeout: int, timeout: float) -> dict:
    """A long Horovod run with --stall-timeout; SIGSTOP of the last rank after its second step. The job must
    end with exit 76 (NO_REQUEUE: not requeued) and the stall line must name that rank and its node."""
    job_env = {
        **env,
        "ENGINE": "horovod",
        "EPOCHS": "1",
        "CHECKPOINT_EVERY": "",
        "NO_REQUEUE": "1",
        "EXTRA_ARGS": f"{SMALL} --max-steps 100000 --stall-timeout {stall_timeout}",
    }
    say(f"stall: sbatch slurm/resnet50_ba.sh on 8 ranks, --stall-timeout {stall_timeout}")
    submitted = time.monotonic()
    job_id = cluster.sbatch(
        f"--nodes={NODES}",
        f"--ntasks-per-node={PER_NODE}",
        *CPU,
        f"--output={cluster.root}/%x-%j.out",
        "slurm/resnet50_ba.sh",
        env=job_env,
        cwd=REPO,
    )
    folder = cluster.root / "runs" / f"resnet50_ba-{job_id}"
    deadline = time.monotonic() + timeout
    steps = 0
    while time.monotonic() < deadline:
        steps = max((r["step"] for r in read_records(folder, "step")), default=0)
        state = cluster.job(job_id)[0]["JobState"]
        if steps >= 2 or state not in ("PENDING", "RUNNING"):
            break
        time.sleep(0.25)
    first_steps = time.monotonic() - submitted
    ranks = rank_processes(cluster, job_id)
    result: dict[str, Any] = {"job_id": job_id, "stall_timeout": stall_timeout, "ranks_seen": len(ranks)}
    if steps < 2 or RANKS - 1 not in ranks:
        result.update(answered=False, why=f"step {steps} logged, ranks found {sorted(ranks)}")
        result["output_tail"] = job_output(cluster, "resnet50_ba", job_id)[-3000:]
        subprocess.run(["scancel", job_id], env=cluster.env, capture_output=True, timeout=30)
        return result
    pid, node = ranks[RANKS - 1]
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    say(
        f"stall: SIGSTOP to rank {RANKS - 1} (pid {pid}, node {node}) at step {steps}, {first_steps:.0f} s after sbatch"
    )
    (task,) = cluster.wait(job_id, timeout=timeout)
    ended = time.monotonic() - stopped
    output = job_output(cluster, "resnet50_ba", job_id)
    line = re.search(
        rf"stalled \(--stall-timeout {stall_timeout}\): rank (\d+) \(node ([^)]*)\) silent for (\d+) s", output
    )
    named = bool(line) and line.group(1) == str(RANKS - 1) and line.group(2) == node  # type: ignore[union-attr]
    whole = next((text for text in output.splitlines() if "stalled (--stall-timeout" in text), None)
    result.update(
        stopped_rank=RANKS - 1,
        stopped_node=node,
        stopped_at_step=steps,
        seconds_to_stop_from_sbatch=first_steps,
        seconds_from_sigstop_to_job_end=ended,
        state=task["JobState"],
        exit=task["ExitCode"],
        stall_line=whole,
        # NO_REQUEUE: lib.sh does not requeue (it would, up to MAX_STALL_REQUEUES times); the job's status is 76.
        answered=named and task["ExitCode"] == "76:0",
    )
    if not result["answered"]:
        result["output_tail"] = output[-3000:]
    # Nothing of it may run on into the next job: the stopped rank is SIGKILLed if srun left it.
    gone = time.monotonic() + 60
    while cluster.task_processes(job_id) and time.monotonic() < gone:
        time.sleep(0.5)
    for left in cluster.task_processes(job_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(left, signal.SIGKILL)
    return result


def sweep_daemons(root: Path) -> list[int]:
    """SIGKILL any munged/slurmctld/slurmd/slurmstepd left whose command line names the cluster's folder."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            name = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if name in DAEMONS and str(root) in cmdline:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Start-up at cluster scale: 4 nodes × 2 ranks on the 1.28 M list",
        "",
        f"`{PROG}` on {machine_line(m)}; Python {m['python']}.",
        "",
        f"The SLURM test cluster of `tests/slurm_cluster.py`: {NODES} nodes (n1–n{NODES}, UTS + mount namespaces at "
        f"127.0.0.2–{NODES + 1}, loopback only), {results['cluster']['cpus_per_node']} CPUs declared per node. "
        f"**All {RANKS} ranks share the machine's {m['cores']} cores** and its memory. Each job: "
        f"`sbatch --nodes={NODES} --ntasks-per-node={PER_NODE} --cpus-per-task=1 --gpus-per-node=0 "
        f"slurm/resnet50_ba.sh`, RECIPE=pipelines/demo.toml, DATA = the {SIZE:,}-line list, "
        f"`{SMALL} --max-steps {MAX_STEPS}`, B={BATCH} over all ranks, M={VIEWS}.",
        "",
        "## Training jobs",
        "",
        "Seconds from `sbatch`: to the batch script's start (its job.txt), to rank 0's `start` record, to its "
        "`startup` record (written at the end of the first step), to the job's end. Rank 0's start-up per "
        "phase (its own clock, from its process's start to the end of its first step; `other` = imports, "
        "checks, validation loaders, broadcast of the weights, the run folder; the imports not timed apart: "
        "here 8 processes import torch, torchvision and DALI at once on 2 cores). Load: the machine's 1-minute "
        "load average before and after the job (other users of the 2 cores included).",
        "",
        "| job | launcher | ranks | state | sbatch → batch | → start record | → first step | → end | "
        "rank 0 start-up: engine / index / model / DALI graph / first step / other = total s | load 1 min |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for run in results["runs"]:
        s = run["seconds_from_sbatch"]
        phases = run.get("startup_s") or {}
        split = " / ".join(
            fmt(phases.get(k), 2) for k in ("engine", "index", "model", "dali_graph", "first_step", "other")
        )
        total = fmt(phases.get("total"), 2)
        label = run["label"] + (" (strace)" if run["traced"] else "")
        lines.append(
            f"| {label} | {run['launcher']} | {run.get('ranks', '—')} | {run['state']} {run['exit']} | "
            f"{fmt(s.get('batch_started'))} | {fmt(s.get('start_record'))} | {fmt(s.get('first_step'))} | "
            f"{fmt(s.get('job_end'))} | {split} = {total} | {' → '.join(fmt(v) for v in run.get('load_1min', []))} |"
        )
    lines += [""]
    for run in results["runs"]:
        before = run["seconds_from_sbatch"].get("first_step")
        total = (run.get("startup_s") or {}).get("total")
        if before is not None and total is not None:
            lines.append(
                f"- {run['label']}{' (strace)' if run['traced'] else ''}: {before - total:.1f} s of the "
                f"{before:.1f} s from sbatch to the first step pass before rank 0's clock starts (SLURM starting "
                "the job, srun or torchrun launching the ranks, the interpreter starting)"
            )
    for run in results["runs"]:
        index = run.get("index") or {}
        if index:
            roles = run.get("index_roles") or []
            lines.append(
                f"- {run['label']}{' (strace)' if run['traced'] else ''}: index of {index.get('samples', 0):,} "
                f"samples listed by rank {index.get('listed_by')} in {fmt(index.get('seconds'), 2)} s; "
                f"{roles.count('received')} rank(s) received it, the same fingerprint on every rank: "
                f"{run.get('index_same_on_every_rank')}"
            )
    lines += ["", "Per rank (rank: node):", ""]
    lines += ["| job | peak RSS MB per rank | stat / getdents / open on the data set per rank (by path) |"]
    lines += ["| --- | --- | --- |"]
    for run in results["runs"]:
        hosts = run.get("hosts") or []
        where = [f"{r}:{hosts[r]}" if r < len(hosts) else str(r) for r in range(RANKS)]
        rss = ", ".join(f"{w} {fmt(v, 0)}" for w, v in zip(where, run.get("rss_mb", []))) or "—"
        calls = (
            "; ".join(
                f"{w} {c['stat']} / {c['getdents']} / {c['open']}" if c else f"{w} —"
                for w, c in zip(where, run.get("calls", []))
            )
            or "—"
        )
        label = run["label"] + (" (strace)" if run["traced"] else "")
        lines.append(f"| {label} | {rss} | {calls} |")
    doctor = results.get("doctor")
    lines += ["", "## The doctor at 8 ranks", ""]
    if doctor:
        lines.append(
            f"`srun --mpi=pmix python -m dali_ba.doctor` (job {doctor['job_id']}): {doctor['state']} "
            f"{doctor['exit']} after {doctor['seconds_from_sbatch']:.1f} s from sbatch; report ranks "
            f"{doctor.get('ranks')}, nodes {', '.join(doctor.get('nodes') or []) or '—'}, ok {doctor.get('ok')}: "
            f"**{'answered' if doctor['answered'] else 'did not answer'}**."
        )
        table = doctor.get("table") or []
        if table:
            lines += ["", "| " + " | ".join(map(str, table[0])) + " |", "|" + " --- |" * len(table[0])]
            lines += ["| " + " | ".join(map(str, row)) + " |" for row in table[1:]]
        for p in doctor.get("problems") or []:
            lines.append(f"- {p['level']}: {p['check']} ({', '.join(p.get('nodes') or [])}): {p['text']}")
    else:
        lines.append("Not run.")
    stall = results.get("stall")
    lines += ["", "## The stall watch at 8 ranks", ""]
    if stall and "stopped_rank" in stall:
        lines.append(
            f"`--stall-timeout {stall['stall_timeout']}`; SIGSTOP to rank {stall['stopped_rank']} on "
            f"{stall['stopped_node']} after step {stall['stopped_at_step']} "
            f"({stall['seconds_to_stop_from_sbatch']:.0f} s after sbatch): the job ended {stall['state']} "
            f"{stall['exit']} {stall['seconds_from_sigstop_to_job_end']:.1f} s after the SIGSTOP (NO_REQUEUE=1: "
            f"lib.sh does not requeue it): **{'answered' if stall['answered'] else 'did not answer'}**. The line:"
        )
        lines += ["", f"> {stall.get('stall_line')}"]
    elif stall:
        lines.append(f"**Did not answer**: {stall.get('why')}")
    else:
        lines.append("Not run.")
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in results["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "dali-ba-startup"), help="data trees")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="cluster_startup.json and .md")
    parser.add_argument(
        "--launchers", default="horovod,torch,torchrun", help="training jobs: horovod, torch (srun), torchrun"
    )
    parser.add_argument("--no-trace", action="store_true", help="skip the strace runs")
    parser.add_argument("--stall-timeout", type=int, default=30, help="seconds, for the stall check (0: skip it)")
    parser.add_argument("--no-doctor", action="store_true", help="skip the doctor")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per job")
    parser.add_argument("--cpus", type=int, default=PER_NODE, help="CPUs declared per node")
    parser.add_argument("--replot", action="store_true", help="rewrite the .md from the .json in --out; run nothing")
    args = parser.parse_args(argv)
    if args.replot:
        results = json.loads((Path(args.out) / "cluster_startup.json").read_text())
        (Path(args.out) / "cluster_startup.md").write_text(markdown(results))
        print(markdown(results))
        return 0
    for tool in ("strace", "/usr/bin/time", "sbatch"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    global DATA_ROOT, cluster_module
    DATA_ROOT = Path(args.root)
    sources = make_sources(DATA_ROOT / "sources", SOURCES)
    val_list = DATA_ROOT / "val.txt"
    if not val_list.exists():  # made once: rewriting it would race with another benchmark reading it
        make_val(DATA_ROOT, sources)
    make_tree(DATA_ROOT, SIZE, sources)
    data = {"train": DATA_ROOT / f"n{SIZE}.txt", "val": val_list}
    cluster_module = load_cluster_module()
    root = Path(tempfile.mkdtemp(prefix="dali-ba-cluster-"))
    root.chmod(0o755)  # munged runs as user munge
    cluster = cluster_module.SlurmCluster(root, nodes=NODES, cpus=args.cpus)
    work = Path(tempfile.mkdtemp(prefix="cluster-startup-"))
    results: dict[str, Any] = {
        "machine": describe_machine(),
        "cluster": {"nodes": NODES, "ranks_per_node": PER_NODE, "cpus_per_node": args.cpus},
        "data": {"train": str(data["train"]), "val": str(data["val"]), "files": SIZE},
        "runs": [],
        "errors": [],
    }
    failed = False
    out = Path(args.out)
    try:
        began = time.monotonic()
        cluster.start(timeout=60)
        results["cluster"]["start_s"] = time.monotonic() - began
        say(f"cluster of {NODES} nodes idle in {results['cluster']['start_s']:.1f} s ({root})")
        env = base_env(cluster, data)
        (root / "runs").mkdir()
        launchers = [name for name in args.launchers.split(",") if name]
        traces = [False] if args.no_trace else [False, True]
        # In this order: the musts first (Horovod's run, the doctor, the stall watch), then the others.
        steps: list[tuple[str, Any]] = []
        for engine in ("horovod", "torch"):
            if engine in launchers:
                for trace in traces:
                    label = f"{engine}{'-trace' if trace else ''}"
                    steps.append(
                        (label, lambda e=engine, t=trace, n=label: train_job(cluster, env, work, n, e, t, args.timeout))
                    )
            if engine == "horovod":
                if not args.no_doctor:
                    steps.append(("doctor", lambda: doctor_job(cluster, env, data, args.timeout)))
                if args.stall_timeout:
                    steps.append(("stall", lambda: stall_job(cluster, env, args.stall_timeout, args.timeout)))
        if "torchrun" in launchers:
            steps.append(("torchrun", lambda: torchrun_job(cluster, env, work, data, args.timeout)))
        for name, step in steps:
            load_before = os.getloadavg()[0]
            try:
                done = step()
                done["load_1min"] = [load_before, os.getloadavg()[0]]  # other users of the 2 cores, before/after
            except Exception as exc:  # one job's failure is recorded; the others still run
                failed = True
                results["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
                say(f"{name}: {type(exc).__name__}: {exc}")
                continue
            if name in ("doctor", "stall"):
                results[name] = done
                failed |= not done["answered"]
            else:
                done["label"] = name.removesuffix("-trace")
                results["runs"].append(done)
                failed |= done["state"] != "COMPLETED"
            say(f"{name}: {json.dumps({k: v for k, v in done.items() if k not in ('table', 'output_tail')})}")
            out.mkdir(parents=True, exist_ok=True)
            (out / "cluster_startup.json").write_text(json.dumps(results, indent=1) + "\n")  # so far
    except Exception as exc:
        failed = True
        results["errors"].append(f"cluster: {type(exc).__name__}: {exc}")
    finally:
        if failed:
            kept = cluster.keep_logs(REPO / "runs" / "cluster-startup-logs" / root.name)
            say(f"daemon logs and job outputs kept in {kept}")
        cluster.stop()
        leftovers = sweep_daemons(root)
        if leftovers:
            say(f"killed leftover daemons {leftovers}")
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster_startup.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "cluster_startup.md").write_text(markdown(results))
    print(markdown(results))
    return 1 if failed else 0


DATA_ROOT = Path(tempfile.gettempdir()) / "dali-ba-startup"
cluster_module: Any = None

if __name__ == "__main__":
    sys.exit(main())
