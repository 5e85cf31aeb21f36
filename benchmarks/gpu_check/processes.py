"""The GPU check's processes: a command run under a limit with its output to a log, its whole process
tree killed at that limit, and the environment every step and its runs get."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root: every step and run starts there


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (trainers, DataLoader workers, even in their own sessions)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int | None, float]:
    """Run ``cmd`` from the repository root with stdout and stderr to ``log``; kill its whole tree at
    ``timeout`` seconds. Returns (exit code, or None when it timed out; seconds)."""
    start = time.perf_counter()
    with open(log, "ab") as out:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            rc = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.wait()
            rc = None
            out.write(f"\n[gpu_check: killed after {timeout:.0f} s]\n".encode())
    return rc, time.perf_counter() - start


def child_env() -> dict:
    """The environment of every step and its runs: the repository root first on ``PYTHONPATH`` (dali_ba and
    benchmarks importable from this checkout, installed or not), output unbuffered."""
    path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(path)), "PYTHONUNBUFFERED": "1"}
