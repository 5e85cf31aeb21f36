"""The package's import structure (setup.cfg, [importlinter]), checked with import-linter: no circles."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT = str(Path(sys.executable).parent / "lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports with the project's contracts on the dali_ba package under ``root`` (it reads the
    package found from the folder it runs in)."""
    return subprocess.run([LINT, "--no-cache", str(REPO / "setup.cfg")], cwd=root, capture_output=True, text=True,
                          timeout=120)


def test_the_package_keeps_its_import_contracts():
    done = lint(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_an_import_that_closes_a_circle_breaks_them(tmp_path):
    """The circle this contract replaced (output -> checkpoint -> output), put back in a copy: refused."""
    shutil.copytree(REPO / "dali_ba", tmp_path / "dali_ba", ignore=shutil.ignore_patterns("__pycache__"))
    output = tmp_path / "dali_ba" / "output.py"
    output.write_text(output.read_text() + "\n\ndef _circle():\n    from dali_ba.checkpoint import load_checkpoint  # noqa\n")
    done = lint(tmp_path)
    assert done.returncode == 1 and "BROKEN" in done.stdout, done.stdout[-3000:]
    assert ".output -> .checkpoint" in done.stdout  # and it names the import to remove
