"""What a number was measured on: the CPU model and cores, torch's CPU kernels, the library versions,
the commit and the date. The same code and seed give other numbers on another CPU (its kernels differ),
so every report and benchmark records this beside its numbers.

Standard library only at import (the GPU check's driver runs it without torch); torch and the other
libraries are asked only if they are installed.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "numpy", "pillow", "horovod", "mpi4py", "timm")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str | None:
    """The instruction set torch's CPU kernels use here (DEFAULT, AVX2, AVX512, ...): where two machines'
    results differ, this is often why."""
    try:
        import torch
    except ImportError:
        return None
    return str(torch.backends.cpu.get_cpu_capability())


def commit() -> str | None:
    """The checkout's commit, with '-dirty' when files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=REPO
        )
    except OSError:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str | None]:
    """The installed versions of the libraries that move numbers (the DALI build under its own name)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    for dist in metadata.distributions():
        if (dist.metadata["Name"] or "").lower().startswith("nvidia-dali"):
            found[dist.metadata["Name"].lower()] = dist.version
    return found


def describe_machine() -> dict[str, Any]:
    """The machine, the software and the moment, JSON-ready."""
    try:
        memory = next(int(line.split()[1]) // 1024**2 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        memory = None
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": memory,
        "cpu_capability": cpu_capability(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """One line for a report: 'AMD EPYC 7B13, 2 cores, torch CPU kernels AVX2; torch 2.14.1, DALI 2.4.0;
    commit 1a2b3c4, 2026-12-03'."""
    v = machine.get("versions", {})
    dali = next((version for name, version in v.items() if name.startswith("nvidia-dali") and version), None)
    software = ", ".join(
        f"{name} {version}" for name, version in (("torch", v.get("torch")), ("DALI", dali)) if version
    )
    return (
        f"{machine['cpu']}, {machine['cores']} cores, torch CPU kernels {machine.get('cpu_capability') or 'unknown'}; "
        f"{software}; commit {machine.get('commit') or 'unknown'}, {machine['date']}"
    )
