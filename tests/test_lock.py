"""Locked installs: make installs every Python package through launch/constraints.txt, and the doctor
warns (never fails) where the installed versions differ from it."""

import subprocess
from importlib import metadata
from pathlib import Path

from conftest import REPO

from dali_ba.doctor.findings import Findings
from dali_ba.doctor.node import check_lock
from dali_ba.doctor.versions import REPO_LOCK, lock_drift, normalize, read_lock


def test_the_lock_pins_what_make_installs_and_both_dali_builds():
    pins = read_lock()
    for name in ("numpy", "pillow", "mpi4py", "horovod", "timm", "ruff", "mypy", "import-linter", "pytest"):
        assert name in pins, name
    assert pins["nvidia-dali-cuda120"] == pins["nvidia-dali-cuda130"]  # the other build, at the same version
    assert "torch" not in pins and "dali-ba" not in pins  # torch: TORCH_SPEC's; dali-ba: this checkout


def test_makes_install_holds_the_locks_versions():
    """This virtualenv was made by make install, through the lock: nothing differs from it."""
    assert lock_drift(read_lock()) == []


def test_a_version_that_differs_from_the_lock_is_a_warning_naming_it(tmp_path):
    numpy = metadata.version("numpy")
    lock = tmp_path / "constraints.txt"
    lock.write_text(
        f"# a comment\nNumPy==0.0.1  # drifted\npillow=={metadata.version('pillow')}\nnot-installed-pkg==1.0\n"
    )
    found = Findings(0, "node1")
    check_lock(found, lock)
    (problem,) = found.problems
    assert problem.level == "warn" and problem.check == "versions"
    assert problem.text.startswith(
        f"1 installed package(s) differ from the lock constraints.txt: numpy {numpy} (lock 0.0.1) — "
    )
    assert found.facts["lock"] == {"file": str(lock), "pins": 3, "differs": {"numpy": [numpy, "0.0.1"]}}
    ok = Findings(0, "node1")
    check_lock(ok, tmp_path / "none.txt")  # no lock (an installed wheel): nothing to compare, nothing said
    assert ok.problems == [] and ok.facts["lock"] is None


def test_names_compare_as_pip_compares_them():
    assert normalize("Import_Linter") == normalize("import-linter") == normalize("import.linter")
    assert REPO_LOCK == Path(REPO) / "launch" / "constraints.txt"


def test_a_missing_constraints_file_is_one_line_before_anything_is_installed(tmp_path):
    done = subprocess.run(
        ["bash", "launch/install.sh", "--print-dali-spec"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "DALI_BA_CONSTRAINTS": str(tmp_path / "nope.txt")},
    )
    assert done.returncode == 1 and done.stdout == ""
    missing = tmp_path / "nope.txt"
    assert done.stderr.strip() == (
        f"install: DALI_BA_CONSTRAINTS={missing}: no such file (a pip constraints file, or none for the newest of "
        "everything)"
    )
