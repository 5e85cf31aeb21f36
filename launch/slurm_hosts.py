#!/usr/bin/env python3
"""A SLURM allocation as a host list for horovodrun -H / mpirun -H: ``node01:4,node02:4``.

    horovodrun -np $SLURM_NTASKS -H $(python3 launch/slurm_hosts.py) python -m dali_ba.train ...

Reads SLURM_JOB_NODELIST (compressed, e.g. ``gpu[01-03,07],login-a1``) and the slots per host from
SLURM_TASKS_PER_NODE (``4(x3),2``), or takes them as arguments. Nodes are expanded by
``scontrol show hostnames`` when it answers and by the pure-Python ``expand_nodelist`` otherwise (a
login node without a SLURM config). Standard library only, so any python3 runs it.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys

PROG = "slurm_hosts.py"


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unclosed '[' in node list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range(body: str, where: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept, as SLURM does)."""
    out = []
    for item in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise ValueError(f"bad range {item!r} in node list {where!r}")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"range {item!r} runs backwards in node list {where!r}")
        width = len(low)
        out += [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names, in order; several bracket groups in one name
    (``rack[1-2]-n[01-02]``) expand to their product, the last group varying fastest."""
    hosts: list[str] = []
    for part in _split_top(nodelist.strip()):
        if not part:
            raise ValueError(f"empty name in node list {nodelist!r}")
        pieces = re.split(r"\[([^\]]*)\]", part)  # text, range, text, range, ..., text
        choices = [[p] if i % 2 == 0 else _expand_range(p, nodelist) for i, p in enumerate(pieces)]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    return hosts


def expand_tasks_per_node(spec: str, count: int) -> list[int]:
    """SLURM_TASKS_PER_NODE ('4(x3),2') -> one slot count per node; must cover ``count`` nodes."""
    slots: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise ValueError(f"bad tasks-per-node item {item!r} in {spec!r}")
        slots += [int(match.group(1))] * int(match.group(2) or 1)
    if len(slots) != count:
        raise ValueError(f"tasks per node {spec!r} gives {len(slots)} node(s), the node list has {count}")
    return slots


def hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames`` when it answers; the pure-Python expansion otherwise (also when
    SLURM_CONF names a missing file, where scontrol would retry for a minute before failing)."""
    conf = os.environ.get("SLURM_CONF")
    if not shutil.which("scontrol") or (conf and not os.path.isfile(conf)):
        return expand_nodelist(nodelist)
    try:
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout.split():
            return done.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return expand_nodelist(nodelist)


def host_list(nodelist: str, slots: int | str) -> str:
    """'host:slots,...' for horovodrun/mpirun -H; ``slots`` is one count or a tasks-per-node spec."""
    hosts = hostnames(nodelist)
    counts = [int(slots)] * len(hosts) if isinstance(slots, int) else expand_tasks_per_node(slots, len(hosts))
    return ",".join(f"{host}:{n}" for host, n in zip(hosts, counts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("nodelist", nargs="?", default=os.environ.get("SLURM_JOB_NODELIST"),
                        help="compressed node list (default: $SLURM_JOB_NODELIST)")
    parser.add_argument("--slots", type=int, help="slots per host (default: $SLURM_TASKS_PER_NODE, else 1)")
    args = parser.parse_args(argv)
    if not args.nodelist:
        parser.error("no node list: give one or run inside an allocation (SLURM_JOB_NODELIST is unset)")
    if args.slots is not None and args.slots < 1:
        parser.error(f"--slots must be >= 1, got {args.slots}")
    slots = args.slots if args.slots is not None else os.environ.get("SLURM_TASKS_PER_NODE") or 1
    try:
        print(host_list(args.nodelist, slots))
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
