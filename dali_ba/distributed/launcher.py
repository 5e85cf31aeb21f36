"""Who started this process, and so which engine averages the gradients (standard library only).

Read from the launcher's environment variables before anything is initialised:

- ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
- MPI launchers (``horovodrun``, ``mpirun``, ``srun --mpi=pmix``) set OMPI_COMM_WORLD_* or PMIX_RANK /
  PMI_RANK (``horovodrun --gloo``: HOROVOD_RANK);
- a plain ``srun`` sets SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID; the rendezvous is the
  first node of the step (or job) node list.

``choose_engine`` turns that into ``horovod``, ``torch`` or ``none`` (one process, nothing to
average), with the reason, which the run's start line and records repeat.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import overload

from dali_ba.errors import UsageError

ENGINES = ("auto", "horovod", "torch")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "HOROVOD_RANK")
RANK_VARIABLES = ("RANK", *MPI_RANK_VARIABLES, "SLURM_PROCID")
SLURM_PORT_BASE = 29500  # rendezvous port under srun: base + (job id + step id) mod 2000 (MASTER_PORT overrides)


@dataclass(frozen=True)
class Launch:
    """This process's place in the job as its launcher announced it."""

    launcher: str  # torchrun, mpi, srun or none
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    master_addr: str | None = None  # rendezvous for the torch engine (None: decided at init)
    master_port: int | None = None


@dataclass(frozen=True)
class EngineChoice:
    engine: str  # horovod, torch or none
    reason: str
    launch: Launch


@overload
def _int(env: Mapping[str, str], *names: str, default: int) -> int: ...
@overload
def _int(env: Mapping[str, str], *names: str, default: None = None) -> int | None: ...
def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return default


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """The launcher of this process, from its environment (torchrun, then MPI, then plain srun)."""
    env = os.environ if env is None else env
    if all(env.get(name) for name in TORCHRUN_VARIABLES):
        return Launch(
            "torchrun",
            _int(env, "RANK", default=0),
            _int(env, "WORLD_SIZE", default=1),
            _int(env, "LOCAL_RANK", default=0),
            env["MASTER_ADDR"],
            _int(env, "MASTER_PORT"),
        )
    in_step = bool(env.get("SLURM_STEP_ID") or env.get("SLURM_STEP_NUM_TASKS"))  # an srun step, not the batch shell
    master_addr, master_port = env.get("MASTER_ADDR"), _int(env, "MASTER_PORT")
    if in_step and not master_addr:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        master_addr = hostnames(nodes)[0] if nodes else None
        job, step = _int(env, "SLURM_JOB_ID", default=0), _int(env, "SLURM_STEP_ID", default=0)
        master_port = master_port or SLURM_PORT_BASE + (job + step) % 2000  # a new port for each step of a job
    if any(env.get(name, "").isdigit() for name in MPI_RANK_VARIABLES):
        return Launch(
            "mpi",
            _int(env, *MPI_RANK_VARIABLES, default=0),
            _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "HOROVOD_SIZE", "SLURM_STEP_NUM_TASKS", default=1),
            _int(
                env, "OMPI_COMM_WORLD_LOCAL_RANK", "HOROVOD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", default=0
            ),
            master_addr,
            master_port,
        )
    if in_step and env.get("SLURM_PROCID", "").isdigit():  # SLURM_PROCID alone: the batch shell, one process
        return Launch(
            "srun",
            _int(env, "SLURM_PROCID", default=0),
            _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1),
            _int(env, "SLURM_LOCALID", default=0),
            master_addr,
            master_port,
        )
    return Launch("none")


def horovod_importable() -> bool:
    """Whether ``import horovod.torch`` can be attempted (without importing it)."""
    try:
        return importlib.util.find_spec("horovod") is not None and importlib.util.find_spec("horovod.torch") is not None
    except (ImportError, ValueError):
        return False


def choose_engine(requested: str, env: Mapping[str, str] | None = None, horovod: bool | None = None) -> EngineChoice:
    """The engine for ``--engine requested`` under this launcher; UsageError if it cannot run here."""
    if requested not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {requested!r}")
    launch = detect_launch(env)
    horovod = horovod_importable() if horovod is None else horovod
    started = {
        "torchrun": "started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR)",
        "mpi": "started by an MPI launcher (OMPI/PMIx/PMI rank variables)",
        "srun": "started by srun without MPI (SLURM_PROCID, SLURM_STEP_NUM_TASKS)",
        "none": "one process, no launcher",
    }[launch.launcher]
    if requested == "horovod":
        if not horovod:
            raise UsageError(
                "--engine horovod: Horovod is not installed here (import horovod.torch fails); "
                "install it (see docs/installing.md) or use --engine torch"
            )
        if launch.launcher in ("torchrun", "srun"):
            raise UsageError(
                f"--engine horovod: this process was {started}; Horovod needs horovodrun, mpirun or "
                "srun --mpi=pmix (or use --engine torch)"
            )
        return EngineChoice("horovod", f"--engine horovod, {started}", launch)
    if requested == "torch":
        return EngineChoice("torch", f"--engine torch, {started}", launch)
    if launch.launcher in ("torchrun", "srun"):
        return EngineChoice("torch", started, launch)
    if launch.launcher == "mpi":
        if not horovod:
            raise UsageError(
                "started by an MPI launcher but Horovod is not installed: install it, or launch with "
                "torchrun or plain srun (the torch engine)"
            )
        return EngineChoice("horovod", f"{started}, Horovod importable", launch)
    return EngineChoice("none", started, launch)


def launcher_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank as any launcher announced it, before initialisation (0 if none)."""
    env = os.environ if env is None else env
    return _int(env, *RANK_VARIABLES, default=0)


# SLURM node lists ------------------------------------------------------------------------------------


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
