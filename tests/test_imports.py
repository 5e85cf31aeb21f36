"""The package's import structure (setup.cfg, [importlinter]), checked with import-linter: the stages in
data-path order, each importing only those below it, and no circles."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

LINT = str(Path(sys.executable).parent / "lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports with the project's contracts on the dali_ba package under ``root`` (it reads the
    package found from the folder it runs in)."""
    return subprocess.run(
        [LINT, "--no-cache", str(REPO / "setup.cfg")], cwd=root, capture_output=True, text=True, timeout=120
    )


def test_the_package_keeps_its_import_contracts():
    done = lint(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    "module, added, named",
    [
        # the circle the contracts replaced (output -> checkpoint -> output), put back
        ("training/output.py", "from dali_ba.training.checkpoint import load_checkpoint", ".output -> .checkpoint"),
        # the loader reaching up a stage, into training (for the step clock, say)
        (
            "loading/loader.py",
            "from dali_ba.training.step_clock import StepClock",
            "dali_ba.loading.loader -> dali_ba.training.step_clock",
        ),
    ],
    ids=["closes a circle", "climbs a stage"],
)
def test_an_import_that_breaks_a_contract_is_refused_and_named(tmp_path, module, added, named):
    """The import added to a copy of the package: lint-imports fails and names it, the import to remove."""
    shutil.copytree(REPO / "dali_ba", tmp_path / "dali_ba", ignore=shutil.ignore_patterns("__pycache__"))
    source = tmp_path / "dali_ba" / module
    source.write_text(source.read_text() + f"\n\ndef _added():\n    {added}  # noqa\n")
    done = lint(tmp_path)
    assert done.returncode == 1 and "BROKEN" in done.stdout, done.stdout[-3000:]
    assert named in done.stdout
