"""Every command-line entry point answers --help: exit 0, a usage text, no traceback."""

import configparser
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from test_deprecated_names import OLD_NAMES  # the tools' old python -m names: tested there

from dali_ba.__main__ import COMMANDS as ONE_COMMAND
from dali_ba.__main__ import summary

COMMANDS = [
    ["dali_ba"],
    ["dali_ba.train"],
    ["dali_ba.tools.profile", "pipeline"],
    ["dali_ba.tools.profile", "step"],
    ["dali_ba.tools.profile", "views"],
    ["dali_ba.tools.profile", "collect"],
    ["dali_ba.doctor"],
    ["dali_ba.install_choice"],
    ["dali_ba.data.shards"],
    ["dali_ba.data.shard_writer"],  # the shard writer's own module; dali_ba.data.shards is its command's old name
    ["dali_ba.data.synth"],
    ["dali_ba.data.digits"],
    ["dali_ba.data.cifar10"],
    # the tools' own modules; their old names (dali_ba.check_data, ...): tests/test_deprecated_names.py
    ["dali_ba.tools.check_data"],
    ["dali_ba.tools.plot"],
    ["dali_ba.tools.profile"],
    ["dali_ba.tools.reproduce"],
]


def console_scripts() -> dict[str, str]:
    """setup.cfg's console scripts: name -> 'module:function'."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines)


def assert_help(done, command: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{command} --help exited {done.returncode}:\n{output[-2000:]}"
    assert done.stdout.lstrip().startswith("usage:"), f"{command} --help printed no usage:\n{output[-2000:]}"
    assert "Traceback" not in output, output[-2000:]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_module_command_answers_help(command):
    assert_help(run_cli(sys.executable, "-m", *command, "--help", timeout=120), f"python -m {' '.join(command)}")


def test_every_module_with_a_command_line_is_listed():
    """A new ``python -m`` entry point gets its --help test too (here, or as a deprecated name)."""
    found = {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__main__")  # a package's: -m package
        for path in (REPO / "dali_ba").rglob("*.py")
        if 'if __name__ == "__main__":' in path.read_text()
    }
    assert found == {command[0] for command in COMMANDS} | set(OLD_NAMES)


@pytest.mark.parametrize("name, target", sorted(console_scripts().items()))
def test_every_console_script_answers_help(name, target):
    """The entry point itself (installed or not), then the installed script where there is one."""
    module, function = target.split(":")
    code = f"import sys; from {module} import {function} as main; sys.argv[0] = {name!r}; sys.exit(main())"
    assert_help(run_cli(sys.executable, "-c", code, "--help", timeout=120), f"{target} ({name})")
    script = Path(sys.executable).parent / name
    if not script.exists():
        pytest.skip(f"{name} is not installed beside {sys.executable} (pip install -e .)")
    assert_help(run_cli(str(script), "--help", timeout=120), name)


@pytest.mark.parametrize("command", sorted(ONE_COMMAND))
def test_dali_ba_command_runs_each_tool(command):
    """``dali-ba <command> --help`` is that tool's own parser, whose description is the line the table shows."""
    done = run_cli(sys.executable, "-m", "dali_ba", command, "--help", timeout=120)
    assert_help(done, f"dali-ba {command}")
    assert summary(ONE_COMMAND[command]).split(":")[0] in " ".join(done.stdout.split())


def test_dali_ba_help_lists_the_table_and_unknown_commands_are_one_line_errors():
    listing = run_cli(sys.executable, "-m", "dali_ba", "--help")
    assert listing.returncode == 0
    listed = [line.split()[0] for line in listing.stdout.split("commands:")[1].strip().splitlines()]
    assert listed == list(ONE_COMMAND)  # every command, in the table's order
    assert {"train", "profile", "doctor", "check-data", "shards", "plot", "reproduce", "synth"} <= set(listed)
    assert {module for module in ONE_COMMAND.values()} <= {command[0] for command in COMMANDS}  # each also runs alone
    wrong = run_cli(sys.executable, "-m", "dali_ba", "trian")
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr.strip().splitlines() == [
        "dali-ba: error: unknown command 'trian'; one of: " + ", ".join(ONE_COMMAND) + " (dali-ba --help)"
    ]
