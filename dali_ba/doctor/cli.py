"""The command: flags, the gather, every rank's checks, and rank 0's report; the exit status says
whether something would stop a run."""

from __future__ import annotations

import platform
import socket
import sys
from dataclasses import asdict
from pathlib import Path

from dali_ba.doctor.findings import Findings, first_line
from dali_ba.doctor.node import (
    check_cores,
    check_dali,
    check_engine,
    check_gpu,
    check_horovod,
    check_lock,
    check_mpi,
    check_python,
    check_slurm,
    check_torch,
)
from dali_ba.doctor.peers import PeersLost, join
from dali_ba.doctor.report import report, write_json
from dali_ba.doctor.storage import (
    check_data,
    check_output,
    mark_shared_output,
    output_seen,
    remove_folders,
    remove_marker,
)
from dali_ba.doctor.verdict import judge
from dali_ba.doctor.versions import requirement_floors
from dali_ba.install_choice import dotted, read_driver

PROG = "python -m dali_ba.doctor"


def examine(peers, recipe, wanted: dict[str, bool], hosts: list[str]) -> Findings:
    """All checks of this rank (the data and output ones on the first rank of each node)."""
    from dali_ba.distributed.launcher import detect_launch
    from dali_ba.distributed.world import World

    rank, host = peers.rank, hosts[peers.rank]
    local = [r for r, h in enumerate(hosts) if h == host]
    found = Findings(rank, host)
    launch = detect_launch()
    found.facts.update(
        launcher=launch.launcher, local_rank=local.index(rank), local_size=len(local), first_on_node=local[0] == rank
    )
    floors = requirement_floors()
    found.facts["floors"] = {name: dotted(floor) for name, floor in floors.items()}
    with found.checking("python"):
        check_python(found, floors)
    with found.checking("versions"):
        check_lock(found)
    torch_works = False
    with found.checking("torch"):
        torch_works = check_torch(found, floors)
    driver = device = None
    with found.checking("gpu"):
        driver = read_driver()
        found.facts["driver"] = driver
        if torch_works:
            device = check_gpu(found, driver, local.index(rank), recipe)
    with found.checking("dali"):
        check_dali(found, driver, found.facts.get("gpu_index"))
    horovod_works = False
    with found.checking("horovod"):
        horovod_works = check_horovod(found, floors)
    with found.checking("engine"):
        check_engine(found, recipe, horovod_works, device)
    with found.checking("mpi"):
        check_mpi(found, launch)
    with found.checking("cores"):
        check_cores(found)
    with found.checking("slurm"):
        check_slurm(found)
    if found.facts["first_on_node"]:
        if wanted["train"] or wanted["val"]:
            with found.checking("data"):
                check_data(found, recipe, wanted, World(rank, peers.size, local.index(rank), len(local)))
        if wanted["output"]:
            with found.checking("output"):
                check_output(found, recipe.run.output, recipe.run.resume)
    return found


def main(argv: list[str] | None = None) -> int:
    """0: nothing would stop a run; 1: something would; 2: bad flags."""
    if sys.version_info < (3, 11):  # noqa: UP036 - run by an older Python: dali_ba.recipe needs tomllib, say so first
        print(
            f"{PROG}: error: Python {platform.python_version()} is older than 3.11, the oldest dali-ba supports — "
            "use Python >= 3.11",
            file=sys.stderr,
        )
        return 1
    from dali_ba import doctor as package  # its docstring's first line describes the command
    from dali_ba.distributed.launcher import detect_launch, launcher_rank
    from dali_ba.errors import UsageError, finite_float
    from dali_ba.recipe import build_parser, resolve
    from dali_ba.training.console import emit

    parser = build_parser(PROG, package.__doc__.splitlines()[0])
    doctor = parser.add_argument_group("the doctor")
    doctor.add_argument("--json", metavar="PATH", help="rank 0 also writes every rank's findings and the problems here")
    doctor.add_argument(
        "--timeout",
        type=finite_float,
        default=300,
        metavar="S",
        help="seconds to wait for every rank at each gather (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    given = {dest for dest, value in vars(args).items() if value is not None}
    wanted = {
        "train": bool(args.recipe) or "data.train" in given,
        "val": bool(args.recipe) or "data.val" in given,
        "output": bool(args.recipe) or "run.output" in given,
    }
    try:
        recipe = resolve(args)
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise UsageError(f"--json {args.json}: its folder does not exist")
        if args.timeout <= 0:
            raise UsageError(f"--timeout must be > 0, got {args.timeout:g}")
    except UsageError as exc:
        if launcher_rank() == 0:
            emit(f"{PROG}: error: {exc}", sys.stderr)
        return 2
    peers = None
    try:
        try:
            peers = join(detect_launch(), args.timeout)
        except Exception as exc:
            raise PeersLost(
                f"cannot join the other ranks ({type(exc).__name__}: {first_line(exc)}) — under an MPI "
                "launcher install mpi4py built against its MPI; under torchrun or a plain srun, check that "
                "every task started and reaches the first node"
            ) from None
        hosts = [h or "?" for h in peers.allgather(socket.gethostname())]
        found = examine(peers, recipe, wanted, hosts)
        facts = found.facts
        facts["problems"] = [asdict(p) for p in found.problems]
        facts["dali_ba"] = _dali_ba_version()
        if wanted["output"]:  # which nodes see which markers: one shared folder, or several
            markers = peers.allgather((facts.get("output") or {}).get("marker"))
            if facts.get("output"):
                facts["output"]["sees"] = output_seen(recipe.run.output, markers)
        ranks = peers.gather(facts)
    except PeersLost as exc:
        emit(f"{PROG}: rank {launcher_rank()}: error: {exc}", sys.stderr)
        if peers is not None:
            peers.end(1, missing=True)
        return 1
    status = 0
    try:
        if ranks is not None:  # rank 0
            mark_shared_output(ranks)
            problems = judge(ranks, recipe, hosts)
            status = 1 if any(p.level == "fail" for p in problems) else 0
            for line in report(ranks, problems, recipe, hosts):
                emit(line)
            if args.json:
                write_json(Path(args.json), ranks, problems, status, hosts)
        if wanted["output"]:
            remove_marker(facts)
            peers.allgather(None)  # every marker gone before a folder the doctor made is removed
            remove_folders([Path(p) for p in (facts.get("output") or {}).get("created", [])])
    except PeersLost as exc:
        emit(f"{PROG}: rank {launcher_rank()}: error: {exc}", sys.stderr)
        status = 1
    peers.end(status, ranks is not None and None in ranks)
    return status


def _dali_ba_version() -> str:
    from dali_ba.version import __version__

    return __version__
