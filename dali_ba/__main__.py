"""One command for every tool: ``dali-ba <command> [options]`` (or ``python -m dali_ba <command>``).

Each command is the ``main(argv)`` of a module that also runs alone (``python -m dali_ba.train``,
``dali-ba-train``, ``python -m dali_ba.tools.plot``); the table below names them, and ``dali-ba --help``
lists it with each module's own one-line description. A module is imported only when its command runs.
The tools' ``python -m`` names from before ``dali-ba <command>`` (dali_ba/check_data.py, plot.py,
profile.py, reproduce.py) are kept for one release: each runs :func:`run_deprecated`.
"""

from __future__ import annotations

import importlib
import sys
from typing import cast

# command -> the module whose main(argv) runs it, in data-path order
COMMANDS: dict[str, str] = {
    "synth": "dali_ba.data.synth",
    "shards": "dali_ba.data.shard_writer",
    "check-data": "dali_ba.tools.check_data",
    "doctor": "dali_ba.doctor",
    "train": "dali_ba.train",
    "profile": "dali_ba.tools.profile",
    "plot": "dali_ba.tools.plot",
    "reproduce": "dali_ba.tools.reproduce",
}
PROG = "dali-ba"


def summary(module: str) -> str:
    """A command's one line: the first line of its module's docstring (its parser's description)."""
    return (importlib.import_module(module).__doc__ or "").strip().splitlines()[0]


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} <command> [options]   ({PROG} <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary(module)}" for name, module in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(
            f"{PROG}: error: unknown command {command!r}; one of: {', '.join(COMMANDS)} ({PROG} --help)",
            file=sys.stderr,
        )
        return 2
    sys.argv[0] = f"{PROG} {command}"
    return cast(int, importlib.import_module(COMMANDS[command]).main(rest))


def run_deprecated(old: str, command: str) -> None:
    """``python -m <old>``, a tool's name before ``dali-ba <command>``: a one-line note on stderr, then
    ``dali-ba <command>`` with this process's arguments, exiting with its status."""
    print(
        f"note: python -m {old} is deprecated and will be removed in the next release; use: {PROG} {command}",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
