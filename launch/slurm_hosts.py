#!/usr/bin/env python3
"""A SLURM allocation as a host list for horovodrun -H / mpirun -H: ``node01:4,node02:4``.

    horovodrun -np $SLURM_NTASKS -H $(python3 launch/slurm_hosts.py) python -m dali_ba.train ...

Reads SLURM_JOB_NODELIST (compressed, e.g. ``gpu[01-03,07],login-a1``) and the slots per host from
SLURM_TASKS_PER_NODE (``4(x3),2``), or takes them as arguments. Nodes are expanded by
``scontrol show hostnames`` when it answers and by the pure-Python ``expand_nodelist`` otherwise (a
login node without a SLURM config). Standard library only (with dali_ba.distributed.launcher, which the torch
engine uses for its rendezvous under srun), so any python3 runs it from the repository.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dali_ba.distributed.launcher: standard library only
from dali_ba.distributed.launcher import expand_nodelist, hostnames

__all__ = ["expand_nodelist", "expand_tasks_per_node", "host_list", "hostnames", "main"]

PROG = "slurm_hosts.py"


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


def host_list(nodelist: str, slots: int | str) -> str:
    """'host:slots,...' for horovodrun/mpirun -H; ``slots`` is one count or a tasks-per-node spec."""
    hosts = hostnames(nodelist)
    counts = [int(slots)] * len(hosts) if isinstance(slots, int) else expand_tasks_per_node(slots, len(hosts))
    return ",".join(f"{host}:{n}" for host, n in zip(hosts, counts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "nodelist",
        nargs="?",
        default=os.environ.get("SLURM_JOB_NODELIST"),
        help="compressed node list (default: $SLURM_JOB_NODELIST)",
    )
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
