"""The DALI build for the driver: launch/install.sh --print-dali-spec under fake nvidia-smi outputs (550, 580,
none), the overrides, and what the installer does with a DALI already installed."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO

from dali_ba.install_choice import DALI_VERSION, DaliBuild, choose, plan

VENV = Path(sys.executable).parent.parent
CUDA120, CUDA130 = f"nvidia-dali-cuda120=={DALI_VERSION}", f"nvidia-dali-cuda130=={DALI_VERSION}"
NO_DRIVER = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."


@pytest.fixture
def machine(tmp_path):
    """A PATH holding only ``dirname`` and, given a driver version, a fake ``nvidia-smi`` that reports it
    (or fails as on a machine without a driver); install.sh --print-dali-spec needs nothing else."""

    def make(driver: str | None, fails: bool = False) -> dict:
        bin_dir = Path(tempfile.mkdtemp(dir=tmp_path))
        os.symlink(shutil.which("dirname"), bin_dir / "dirname")
        if driver or fails:
            script = bin_dir / "nvidia-smi"
            body = f'echo "{NO_DRIVER}"; exit 9' if fails else f'echo "{driver}"; echo "{driver}"'  # two GPUs
            script.write_text(f"#!/bin/sh\n{body}\n")
            script.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k not in ("DALI_CUDA", "DALI_SPEC")}
        return {**env, "PATH": str(bin_dir)}

    return make


def print_spec(env: dict, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/bin/bash", str(REPO / "launch" / "install.sh"), "--print-dali-spec", *flags, str(VENV)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )


@pytest.mark.parametrize(
    "driver, fails, spec, reason",
    [
        (
            "550.54.15",
            False,
            CUDA120,
            "driver 550.54.15: nvidia-dali-cuda120 (nvidia-dali-cuda130 needs driver >= 580)",
        ),
        ("535.183.01", False, CUDA120, "driver 535.183.01: nvidia-dali-cuda120"),
        ("525.60.13", False, CUDA120, "driver 525.60.13: nvidia-dali-cuda120"),
        ("580.65.06", False, CUDA130, "driver 580.65.06: nvidia-dali-cuda130"),
        (None, False, CUDA130, "no NVIDIA driver found (nvidia-smi): nvidia-dali-cuda130, the CPU default"),
        (None, True, CUDA130, "no NVIDIA driver found"),
    ],
)
def test_install_sh_picks_the_build_the_driver_runs(machine, driver, fails, spec, reason):
    done = print_spec(machine(driver, fails))
    assert done.returncode == 0, done.stderr
    assert done.stdout == spec + "\n" and reason in done.stderr


def test_a_driver_too_old_for_any_build_is_one_line(machine):
    done = print_spec(machine("470.82.01"))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == (
        "python -m dali_ba.install_choice: error: NVIDIA driver 470.82.01 is older than "
        "525.60, the oldest any DALI build supports (nvidia-dali-cuda120): update the driver, "
        "or name an older DALI with DALI_SPEC"
    )


def test_the_flag_and_the_variables_override_the_driver(machine):
    env = machine("550.54.15")
    done = print_spec(env, "--dali-cuda", "130")
    assert done.stdout == CUDA130 + "\n" and "it needs driver >= 580; this machine has 550.54.15" in done.stderr
    assert print_spec({**machine("580.65.06"), "DALI_CUDA": "120"}).stdout == CUDA120 + "\n"
    assert (
        print_spec({**env, "DALI_SPEC": "nvidia-dali-cuda120==2.3.0"}, "--dali-cuda", "130").stdout
        == "nvidia-dali-cuda120==2.3.0\n"
    )
    bad = print_spec(env, "--dali-cuda", "11")
    assert bad.returncode == 2 and bad.stderr.strip().endswith("--dali-cuda / DALI_CUDA must be 120 or 130, got '11'")
    unknown = print_spec(env, "--dali-cuda-please")
    assert unknown.returncode == 2 and unknown.stderr.startswith("install: unknown option --dali-cuda-please")


@pytest.mark.parametrize(
    "driver, override, installed, expected",
    [
        ("550.54.15", None, None, f"install {CUDA120}"),
        ("550.54.15", None, DaliBuild("nvidia-dali-cuda130", "2.4.0", 13), f"replace nvidia-dali-cuda130 {CUDA120}"),
        ("550.54.15", None, DaliBuild("nvidia-dali-cuda120", "2.3.0", 12), "keep nvidia-dali-cuda120==2.3.0"),
        ("580.65.06", None, DaliBuild("nvidia-dali-cuda120", "2.4.0", 12), f"replace nvidia-dali-cuda120 {CUDA130}"),
        # no driver: a build installed on purpose (for GPU nodes, from a login node) stays, unless one is named
        (None, None, DaliBuild("nvidia-dali-cuda120", "2.4.0", 12), "keep nvidia-dali-cuda120==2.4.0"),
        (None, "130", DaliBuild("nvidia-dali-cuda120", "2.4.0", 12), f"replace nvidia-dali-cuda120 {CUDA130}"),
    ],
)
def test_what_the_installer_does_with_the_dali_it_finds(driver, override, installed, expected):
    assert plan(choose(driver, override), installed) == expected


def test_the_plan_for_this_python():
    done = subprocess.run(
        [sys.executable, "-m", "dali_ba.install_choice", "--plan", "--driver", "550.54.15"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0 and done.stdout.split()[0] in ("install", "keep", "replace")
