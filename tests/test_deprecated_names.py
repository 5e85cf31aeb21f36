"""The tools' ``python -m`` names from before ``dali-ba <command>``, kept for one release: each prints a
one-line note on stderr naming its command, then runs that command with the same arguments and exit status."""

import sys

import pytest
from conftest import run_cli
from PIL import Image

from dali_ba.__main__ import COMMANDS

# old module -> the dali-ba command it runs; each goes with its module (CHANGELOG.md, Deprecated)
OLD_NAMES = {
    "dali_ba.check_data": "check-data",
    "dali_ba.plot": "plot",
    "dali_ba.profile": "profile",
    "dali_ba.reproduce": "reproduce",
}


def note(old: str, command: str) -> str:
    return f"note: python -m {old} is deprecated and will be removed in the next release; use: dali-ba {command}"


def test_each_old_name_runs_a_command_of_the_table():
    assert set(OLD_NAMES.values()) <= set(COMMANDS)


@pytest.mark.parametrize("old", OLD_NAMES)
def test_old_name_prints_the_note_then_the_commands_help(old):
    command = OLD_NAMES[old]
    done = run_cli(sys.executable, "-m", old, "--help", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.splitlines() == [note(old, command)]
    assert done.stdout.startswith(f"usage: dali-ba {command} "), done.stdout[:200]
    new = run_cli(sys.executable, "-m", "dali_ba", command, "--help", timeout=120)
    assert (new.returncode, new.stdout, new.stderr) == (0, done.stdout, "")


@pytest.mark.parametrize("old", OLD_NAMES)
def test_old_name_passes_its_arguments_and_exit_status_on(old):
    """A usage mistake: the note, then the command's own one-line error, exit 2."""
    command = OLD_NAMES[old]
    done = run_cli(sys.executable, "-m", old, "--no-such-flag", timeout=120)
    new = run_cli(sys.executable, "-m", "dali_ba", command, "--no-such-flag", timeout=120)
    assert new.returncode == 2 and new.stderr.startswith(f"dali-ba {command}: error: "), new.stderr
    assert (done.returncode, done.stdout) == (2, new.stdout)
    assert done.stderr.splitlines() == [note(old, command), *new.stderr.splitlines()]


def test_old_check_data_exits_1_on_a_bad_file_as_the_command_does(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        Image.new("RGB", (32, 24), (40 * len(cls), 90, 160)).save(tmp_path / "data" / cls / "good.jpg")
    (tmp_path / "data" / "b" / "bad.jpg").write_bytes(b"not a jpeg")
    done = run_cli(
        sys.executable,
        "-m",
        "dali_ba.check_data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "bad.txt"),
        "--workers",
        "1",
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.splitlines()[0] == note("dali_ba.check_data", "check-data")
    assert [line.split("\t")[0] for line in (tmp_path / "bad.txt").read_text().splitlines()] == [
        str(tmp_path / "data" / "b" / "bad.jpg")
    ]
