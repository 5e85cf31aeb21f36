"""The GPU check's ``tests`` step: the GPU-relevant test files, each in its own pytest process under its
own limit, so that one file's failures, crash or hang never hide another's outcomes.

The GPU-relevant tests are those marked ``strict_device`` (``pytestmark = pytest.mark.strict_device`` at
the top of their file; setup.cfg registers the marker), the tests that ``make test``'s second pass runs
on the strict device's stand-in (``pytest --strict-device -m strict_device``): one list for both."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_check import pytest_failures
from benchmarks.gpu_check.context import Ctx, gpu
from benchmarks.gpu_check.processes import REPO, child_env, kill_tree

MARKER = "strict_device"
OWN_TEST = "test_gpu_check.py"  # marked too (make test's strict pass runs the smoke run), never run by the check
SMOKE_TESTS = (
    "test_train_batch_shapes_dtypes_and_layout",
    "test_bad_loader_arguments",
    "test_eval_views_average_the_softmax_over_the_views",
    "test_lr_schedule_warms_up_then_decays",
)
# The smoke run's files: those holding SMOKE_TESTS, and one where -k selects nothing (its own outcome).
SMOKE_FILES = ("test_loader.py", "test_evaluation.py", "test_odd_files.py", "test_step.py")
NOTHING_SELECTED = 5  # pytest's exit status when -k leaves no test of a file
FILE_SHARE = 0.75  # a file's limit: this share of the step's, so that a hung file leaves time to the others
OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")


def marked_files(tests: Path = REPO / "tests") -> list[str]:
    """The test files that mark tests ``strict_device``, less this check's own; the largest first (a rough
    stand-in for the longest), so that the long ones start first."""
    found = [path for path in tests.glob("test_*.py") if path.name != OWN_TEST and marks(path)]
    return [path.name for path in sorted(found, key=lambda path: (-path.stat().st_size, path.name))]


def marks(path: Path) -> bool:
    """Whether a test file marks tests ``strict_device``: ``pytest.mark.strict_device`` anywhere in its code
    (``pytestmark`` for the whole file, or a decorator), read without importing it."""
    tree = ast.parse(path.read_text(), str(path))
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == MARKER
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "mark"
        for node in ast.walk(tree)
    )


def step_tests(ctx: Ctx) -> int:
    """The GPU-relevant test files on CUDA where a GPU is visible (the loaders pick the mixed decoder),
    each in its own pytest process (``test_parallel`` at once) under its own limit, its tests marked
    ``strict_device``; per file: exit status, time, counts, failed tests. Tests whose launchers are not
    installed are deselected, and named."""
    files = marked_files()
    deselected = {"make_demo": "runs make demo (installs a virtualenv, 2 Horovod ranks)"}
    if importlib.util.find_spec("horovod") is None:
        files = [name for name in files if name != "test_step.py"]  # imports Horovod at the top
        deselected.update(
            horovodrun="Horovod is not installed",
            more_ranks_than_samples="uses horovodrun",
            mpirun="its ranks under mpirun need Horovod",  # failed so on the first GPU run
            signal_to_one_rank="uses mpirun",
            **{"test_step.py": "imports Horovod"},
        )
    elif shutil.which("mpirun") is None:
        deselected.update(mpirun="mpirun is not installed", signal_to_one_rank="uses mpirun")
    select = " and ".join(f"not {name}" for name in deselected if not name.endswith(".py"))
    if ctx.smoke:
        select = f"({' or '.join(SMOKE_TESTS)}) and {select}"
        files = [name for name in files if name in SMOKE_FILES]
    file_limit = FILE_SHARE * ctx.left()
    r = ctx.result
    r.update(
        files=files,
        deselected=deselected,
        select=select,
        cuda=gpu(),
        parallel=ctx.sizes.test_parallel,
        file_limit_s=round(file_limit, 1),
        per_file={},
    )
    ctx.save()
    waiting, running = list(files), {}
    while waiting or running:
        while waiting and len(running) < ctx.sizes.test_parallel:
            name = waiting.pop(0)
            limit = min(file_limit, ctx.left())
            if limit < 10:  # not even time to import torch and DALI
                r["per_file"][name] = dict(status="skipped (no time left)", limit_s=round(limit, 1))
                continue
            running[name] = PytestFile(name, select, ctx.dir, limit)
            r["per_file"][name] = dict(status="running", limit_s=round(limit, 1))
        time.sleep(0.2)
        for name, run in list(running.items()):
            if run.done():
                del running[name]
                r["per_file"][name] = run.record()
                ctx.save()
    r.update(totals(r["per_file"]))
    ctx.save()
    return 0 if all(f["status"] in ("ok", "nothing selected") for f in r["per_file"].values()) else 1


class PytestFile:
    """``pytest -v -m strict_device`` on one test file in the background, its output to ``<file>.log``, its
    JUnit report beside it and each failure's report to ``<file>.failures.txt`` as it happens; its whole
    process tree killed at ``limit`` seconds."""

    def __init__(self, name: str, select: str, folder: Path, limit: float) -> None:
        stem = name.removesuffix(".py")
        self.name, self.limit, self.log = name, limit, folder / f"{stem}.log"
        self.failures = folder / f"{stem}.failures.txt"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "-rfE",
            "-p",
            "benchmarks.gpu_check.pytest_failures",
            f"--junitxml={folder / f'{stem}.junit.xml'}",
            "-m",
            MARKER,
            "-k",
            select,
            f"tests/{name}",
        ]
        self.start, self.rc, self.timed_out = time.perf_counter(), None, False
        env = dict(child_env(), **{pytest_failures.ENV: str(self.failures)})
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)

    def done(self) -> bool:
        """Whether it has ended (killed first, where it ran past its limit)."""
        if self.process.poll() is not None:
            self.rc = self.process.returncode
            return True
        if time.perf_counter() - self.start < self.limit:
            return False
        kill_tree(self.process.pid)
        self.process.wait()
        self.timed_out = True
        with open(self.log, "a") as out:
            out.write(f"\n[gpu_check: killed after {self.limit:.0f} s]\n")
        return True

    def record(self) -> dict:
        outcomes = read_outcomes(self.log.read_text(errors="replace"))
        counts = {kind: sum(1 for v in outcomes.values() if v == kind) for kind in sorted(set(outcomes.values()))}
        failed = [test for test, kind in outcomes.items() if kind in ("FAILED", "ERROR")]
        if self.timed_out:
            status = "timed out"
        elif self.rc == 0:
            status = "ok"
        elif self.rc == NOTHING_SELECTED:
            status = "nothing selected"
        else:
            status = f"failed (rc {self.rc})"
        return dict(
            status=status,
            rc=self.rc,
            seconds=round(time.perf_counter() - self.start, 1),
            limit_s=round(self.limit, 1),
            counts=counts,
            failed=failed,
            reasons=failure_reasons(self.failures.read_text(errors="replace") if self.failures.is_file() else ""),
        )


def failure_reasons(text: str) -> dict[str, str]:
    """{test id: the first ``E`` line of its failure} from the plugin's ``<file>.failures.txt``."""
    reasons: dict[str, str] = {}
    test = None
    for line in text.splitlines():
        if line.startswith("=== ") and line.endswith(")"):
            test = line[4:].rsplit(" (", 1)[0]
        elif test and test not in reasons and line.startswith("E "):
            reasons[test] = line[1:].strip()[:300]
    return reasons


def totals(per_file: dict[str, dict]) -> dict:
    """The counts and failed tests over every file, and which files did not end well."""
    counts: dict[str, int] = {}
    for record in per_file.values():
        for kind, n in record.get("counts", {}).items():
            counts[kind] = counts.get(kind, 0) + n
    return dict(
        counts=dict(sorted(counts.items())),
        failed=[t for f in per_file.values() for t in f.get("failed", [])],
        reasons={t: why for f in per_file.values() for t, why in f.get("reasons", {}).items()},
        timed_out=[name for name, f in per_file.items() if f["status"] == "timed out"],
        not_ok=[name for name, f in per_file.items() if f["status"] not in ("ok", "nothing selected")],
    )


def read_outcomes(log: str) -> dict[str, str]:
    """{test id: PASSED/FAILED/ERROR/SKIPPED/...} from pytest -v lines (also from a log cut short)."""
    outcomes = {}
    for line in log.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in OUTCOMES:
            outcomes[parts[0]] = parts[1] if parts[0] not in outcomes or parts[1] == "ERROR" else outcomes[parts[0]]
    return outcomes
