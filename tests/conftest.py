"""Shared fixtures: small real JPEG datasets written once per test session."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dali_ba import strict_device
from dali_ba.data.synth import write_dataset

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# What the suite runs on: the first GPU and DALI's mixed decoder where one is visible (make gpu-check
# runs the GPU-relevant tests there), else the CPU. With --strict-device (or DALI_BA_STRICT_DEVICE set)
# and no GPU, the stand-in device of dali_ba.strict_device, in this process and every one it starts.
GPU = torch.cuda.is_available()
STRICT = not GPU and ("--strict-device" in sys.argv or strict_device.enabled())
if STRICT:
    os.environ[strict_device.ENV] = os.environ.get(strict_device.ENV) or "1"
    strict_device.enable()
DEVICE, DECODER = ("cuda", "mixed") if GPU else (str(strict_device.STANDIN) if STRICT else "cpu", "cpu")


# The tiers (make test-fast runs neither; make test runs all): a test that starts processes (itself, through
# a helper of the tests or a fixture) is slow; one that uses the simulated SLURM cluster is also multinode.
STARTS_PROCESSES = re.compile(r"\b(run_cli|subprocess\.|Popen|os\.fork|multiprocessing)\b")


def _starts_processes(function, seen: set) -> bool:
    """Whether ``function``'s source, or that of a tests/ function it names, starts a process."""
    if not inspect.isfunction(function) or function in seen or not inspect.getfile(function).startswith(str(TESTS)):
        return False
    seen.add(function)
    if STARTS_PROCESSES.search(inspect.getsource(function)):
        return True
    names = [function.__globals__.get(name) for name in function.__code__.co_names]
    return any(_starts_processes(f, seen) for f in names if f is not None)


# make test runs its CPU pass on parallel workers (pytest-xdist, one file to a worker: --dist loadfile),
# which take files in collection order: the longest files first, so that no worker is left with one at the end.
# Measured at dc849f0 on 2 cores (seconds, one after another): multinode 191, stall 179, models 87,
# reproduce 84, slurm 78, output 75, benchmarks 72, engines 62; in the strict pass the GPU check's smoke
# run 130, train, resume, bad_files.
LONGEST_FIRST = [
    "test_gpu_check",
    "test_multinode",
    "test_stall",
    "test_models",
    "test_reproduce",
    "test_slurm",
    "test_output",
    "test_benchmarks",
    "test_engines",
    "test_train",
    "test_resume",
    "test_bad_files",
]


def _longest_first(item: pytest.Item) -> int:
    name = item.path.stem
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_longest_first)  # stable: each file's own order (and its fixtures' scope) is kept
    for item in items:
        function = getattr(item, "function", None)
        info = getattr(item, "_fixtureinfo", None)
        fixtures = [d.func for defs in info.name2fixturedefs.values() for d in defs] if info else []
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.multinode)
        seen: set = set()
        if any(_starts_processes(f, seen) for f in [function, *fixtures]):
            item.add_marker(pytest.mark.slow)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--strict-device",
        action="store_true",
        help="run on dali_ba.strict_device's stand-in device: GPU manners on the CPU (no GPU only)",
    )


ID_STEP = 10  # red-channel level between identity images


def identity_image(index: int, width: int = 96, height: int = 72) -> Image.Image:
    """An image whose red channel (10 * index) says which file it is, with gradients that make
    every crop and flip look different in the other two channels."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([np.full((height, width), ID_STEP * index), x, (x * y / 255 + y) / 2], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def decode_identity(images) -> np.ndarray:
    """Red-channel mean of each image -> the index it was written with (image axes last-but-3)."""
    red = images[..., 0, :, :].float().mean(dim=(-1, -2)).cpu().numpy()
    return np.rint(red / ID_STEP).astype(int)


@pytest.fixture(scope="session")
def identity_list(tmp_path_factory) -> tuple[Path, int]:
    """20 identity JPEGs, varied sizes, and a file list labelling each with its own index."""
    root = tmp_path_factory.mktemp("identity")
    n = 20
    lines = []
    for i in range(n):
        identity_image(i, 80 + 7 * i, 60 + 5 * (i % 4)).save(root / f"img{i:02d}.jpg", quality=95, subsampling=0)
        lines.append(f"img{i:02d}.jpg {i}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root / "list.txt", n


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The embedded demo dataset, small: 10 classes x (24 train, 6 val)."""
    return write_dataset(tmp_path_factory.mktemp("demo"), train_per_class=24, val_per_class=6, seed=0)


# Every command a test runs keeps its whole output here (a failure message shows a tail: tail()).
LOGS = Path(os.environ.get("DALI_BA_TEST_LOGS") or tempfile.mkdtemp(prefix="dali-ba-test-logs-"))
_runs = itertools.count()


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with the venv's bin on PATH; returns the finished process (text output), whose
    whole stdout and stderr are also kept in a file (``.log``) under LOGS."""
    full_env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMPI_MCA_mpi_yield_when_idle": "1",
        **(env or {}),
    }
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=full_env)
    done.log = keep_output(args, done.stdout, done.stderr)  # type: ignore[attr-defined]
    return done


def keep_output(args, stdout: str, stderr: str) -> Path:
    """Write a command's whole output to a file of its own under LOGS; returns its path."""
    LOGS.mkdir(parents=True, exist_ok=True)
    name = "-".join(Path(str(a)).name for a in args if not str(a).startswith("-"))[:80] or "command"
    path = LOGS / f"{os.getpid()}-{next(_runs):04d}-{name}.log"  # the pid: parallel workers may share LOGS
    path.write_text(f"$ {' '.join(map(str, args))}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    return path


def tail(done, chars: int = 6000) -> str:
    """A failure message: where the whole output is, then the end of stderr (a rank's faulthandler
    stack included) and of stdout."""
    log = getattr(done, "log", None)
    stderr, stdout = (done.stderr or "")[-chars:], (done.stdout or "")[-1500:]
    return f"whole output: {log}\n--- stderr (end)\n{stderr}\n--- stdout (end)\n{stdout}"


def last_logged_step(output: Path) -> int:
    """The last step rank 0 has logged in ``output``'s metrics.jsonl (0 before the first); a line still
    being written is not read. Once step N is logged, every rank has left step N-1's checkpoint: N's
    gradients were averaged over all of them."""
    path = output / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    rows = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
    return max((r["step"] for r in rows if r["kind"] == "step"), default=0)
