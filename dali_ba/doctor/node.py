"""Every rank's checks of its own node: Python, torch, the GPU and driver, DALI (and the hardware JPEG
decoder), Horovod, the engine the launcher gets, MPI, cores, SLURM, and the installed versions against
make's lock. Each records facts and problems in
a :class:`~dali_ba.doctor.findings.Findings`."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dali_ba.doctor.findings import Findings, first_line
from dali_ba.doctor.hardware_jpeg import PROBE_TIMEOUT_S
from dali_ba.doctor.hardware_jpeg import decodes as hardware_jpeg_decodes
from dali_ba.doctor.versions import REPO_LOCK, lock_drift, read_lock
from dali_ba.install_choice import (
    DRIVER_FLOOR,
    MIN_DALI,
    DriverTooOld,
    choose,
    dotted,
    driver_supports,
    installed_dali,
    version_tuple,
)

if TYPE_CHECKING:
    from dali_ba.distributed.launcher import Launch
    from dali_ba.recipe import Recipe

SLURM_STEP_VARIABLES = (
    "SLURM_STEP_ID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_NODELIST",
    "SLURM_CPUS_ON_NODE",
    "SLURM_GPUS_ON_NODE",
    "SLURM_JOB_GPUS",
)


def check_python(found: Findings, floors: dict[str, tuple[int, ...]]) -> None:
    found.facts.update(python=platform.python_version(), executable=sys.executable)
    floor = floors.get("python")
    if floor and sys.version_info[: len(floor)] < floor:
        found.fail(
            "python",
            f"Python {platform.python_version()} is older than {dotted(floor)}, the oldest dali-ba "
            f"supports — use Python >= {dotted(floor)} (a new virtualenv)",
        )


def check_lock(found: Findings, lock: Path = REPO_LOCK) -> None:
    """The installed versions against make's lock (launch/constraints.txt): a warning, never a failure
    (your own versions are allowed: DALI_BA_CONSTRAINTS), but numbers measured with other versions move."""
    pins = read_lock(lock)
    drift = lock_drift(pins)
    found.facts["lock"] = (
        {"file": str(lock), "pins": len(pins), "differs": {n: [i, want] for n, i, want in drift}} if pins else None
    )
    if drift:
        shown = ", ".join(f"{name} {have} (lock {want})" for name, have, want in drift[:6])
        more = f" and {len(drift) - 6} more" if len(drift) > 6 else ""
        found.warn(
            "versions",
            f"{len(drift)} installed package(s) differ from the lock {lock.name}: {shown}{more} — runs may not "
            "repeat the documented numbers; make install puts the lock's versions back "
            "(keep yours: DALI_BA_CONSTRAINTS)",
        )


def check_torch(found: Findings, floors: dict[str, tuple[int, ...]]) -> bool:
    """torch and torchvision: importable, not older than the floors. Returns whether torch imports."""
    facts = found.facts
    for name in ("torch", "torchvision"):
        try:
            module = __import__(name)
        except Exception as exc:
            facts[name] = None
            found.fail(
                "torch",
                f"{name} cannot be imported ({first_line(exc)}) — install "
                f"{name}>={dotted(floors.get(name, ()))} (see docs/installing.md)",
            )
            continue
        facts[name] = module.__version__
        floor = floors.get(name)
        if floor and version_tuple(module.__version__) < floor:
            found.fail(
                "torch",
                f"{name} {module.__version__} is older than {dotted(floor)}, the oldest dali-ba "
                f"supports — install {name}>={dotted(floor)}",
            )
    if facts.get("torch") is None:
        return False
    import torch
    import torch.distributed as dist

    facts["torch_cuda"] = torch.version.cuda
    facts["torch_backends"] = {
        "nccl": dist.is_available() and dist.is_nccl_available(),
        "gloo": dist.is_available() and dist.is_gloo_available(),
    }
    return True


def check_gpu(found: Findings, driver: str | None, local_rank: int, recipe: Recipe) -> str | None:
    """The driver, the GPUs torch sees and the one this rank will train on (as the trainer picks it);
    returns the device ('cuda:1', 'cpu')."""
    import torch

    from dali_ba.distributed.placement import gpu_placement, training_device

    facts = found.facts
    cuda = torch.version.cuda
    facts["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cuda and driver and not driver_supports(int(version_tuple(cuda)[0]), driver):
        found.fail(
            "gpu",
            f"torch {torch.__version__} is built for CUDA {cuda}, which needs NVIDIA driver >= "
            f"{dotted(DRIVER_FLOOR[version_tuple(cuda)[0]])}, and this node has {driver}: torch sees no GPU "
            "— install a torch build for this driver's CUDA (download.pytorch.org's cu12x wheels: "
            "TORCH_SPEC for launch/install.sh)",
        )
    elif driver and not torch.cuda.is_available():
        if cuda is None:
            found.warn(
                "gpu",
                f"torch {torch.__version__} is a CPU build, so this node's GPUs stay idle — install a CUDA "
                "build of torch",
            )
        else:
            found.warn(
                "gpu",
                "nvidia-smi finds a GPU but torch sees none (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}) — request GPUs for the tasks "
                "(srun --gpus-per-task / --gpus-per-node)",
            )
    device = training_device(local_rank)
    place = gpu_placement(device)
    facts.update(
        device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        gpu_index=place.gpu_index,
        gpu_uuid=place.gpu_uuid,
        visible_gpus=place.visible_gpus,
    )
    if device.type != "cuda":
        if recipe.data.decoder == "mixed":
            found.fail(
                "gpu",
                "--decoder mixed needs a GPU and this rank sees none — use --decoder auto (or cpu), or request GPUs",
            )
        if recipe.model.amp == "fp16":
            found.fail("gpu", "--amp fp16 needs a GPU and this rank sees none — use --amp bf16 on CPU, or request GPUs")
    return str(device)


def check_dali(found: Findings, driver: str | None, gpu_index: int | None) -> None:
    """The DALI build installed, whether it imports, is not older than :data:`MIN_DALI` and runs on this
    driver, and (on a GPU) whether its decoding library reaches the hardware JPEG decoder."""
    build = installed_dali()
    facts = found.facts["dali"] = {
        "package": build and build.package,
        "version": build and build.version,
        "cuda": build and build.cuda_major,
        "importable": False,
        "hardware_jpeg": None,
    }
    try:
        choice = choose(driver).spec
    except DriverTooOld as exc:
        found.fail("dali", f"{exc}")
        choice = None
    try:
        import nvidia.dali
        import nvidia.dali.backend
    except Exception as exc:
        facts["error"] = first_line(exc)
        found.fail(
            "dali",
            f"NVIDIA DALI cannot be imported ({first_line(exc)}) — pip install {choice or 'nvidia-dali'} "
            "(bash launch/install.sh picks the build for the driver)",
        )
        return
    facts.update(importable=True, version=nvidia.dali.__version__)
    if version_tuple(facts["version"]) < version_tuple(MIN_DALI):
        found.fail(
            "dali",
            f"{facts['package'] or 'DALI'} {facts['version']} is older than {MIN_DALI}, the oldest "
            "dali-ba supports (its graphs need the dynamic executor, exec_dynamic) — pip install "
            f"{choice or f'nvidia-dali>={MIN_DALI}'} (bash launch/install.sh picks the build for the driver)",
        )
    if facts["cuda"] is None:  # no package metadata (DALI on PYTHONPATH): the CUDA it was built with
        facts["cuda"] = int(getattr(nvidia.dali.backend, "__cuda_version__", 0)) // 1000 or None
    if driver and facts["cuda"] and choice and not driver_supports(facts["cuda"], driver):
        found.fail(
            "dali",
            f"{facts['package'] or 'DALI'} {facts['version']} is built for CUDA {facts['cuda']}, which needs "
            f"NVIDIA driver >= {dotted(DRIVER_FLOOR[facts['cuda']])}, and this node has {driver} — "
            f"pip uninstall -y {facts['package'] or 'nvidia-dali'} && pip install {choice} "
            "(or run bash launch/install.sh here)",
        )
        return
    if gpu_index is not None:
        facts["hardware_jpeg"], reason = hardware_jpeg(gpu_index)
        if not facts["hardware_jpeg"]:
            found.warn(
                "dali",
                f"no hardware JPEG decoder on this GPU ({reason}): DALI decodes on the GPU's cores with "
                "Huffman decoding on the CPU — runs, but needs more CPU per image: give ranks cores "
                "to match --dali-threads",
            )


def hardware_jpeg(gpu_index: int, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether nvImageCodec (the library DALI's mixed decoder uses) decodes a small JPEG with its
    hardware backend alone on GPU ``gpu_index`` (A100, H100 and others have such engines), and why not;
    asked in a child process under a time limit (:mod:`dali_ba.doctor.hardware_jpeg`)."""
    answer = hardware_jpeg_decodes(gpu_index, timeout=timeout)
    if isinstance(answer, str):
        return False, answer
    return (True, "") if answer else (False, "nvImageCodec's hardware backend decoded nothing")


def check_horovod(found: Findings, floors: dict[str, tuple[int, ...]]) -> bool:
    """Horovod's version and what it was built with (as horovodrun --check-build); returns whether
    ``import horovod.torch`` works."""
    from dali_ba.distributed.launcher import horovod_importable

    facts = found.facts["horovod"] = {"installed": horovod_importable()}
    if not facts["installed"]:
        return False
    try:
        import horovod
        import horovod.torch as hvd
    except Exception as exc:
        facts["error"] = first_line(exc)
        return False
    facts.update(
        version=horovod.__version__,
        mpi=bool(hvd.mpi_built()),
        gloo=bool(hvd.gloo_built()),
        nccl=bool(hvd.nccl_built()),
        cuda=bool(hvd.cuda_built()),
    )
    floor = floors.get("horovod")
    if floor and version_tuple(horovod.__version__) < floor:
        found.warn(
            "horovod",
            f"Horovod {horovod.__version__} is older than {dotted(floor)}, the oldest dali-ba is tested "
            "with — build 0.28.1 (launch/install.sh shows how), or use the torch engine",
        )
    return True


def check_engine(found: Findings, recipe: Recipe, horovod_works: bool, device: str | None) -> None:
    """The engine ``--engine`` picks under this launcher (as the trainer decides it) and whether what
    it needs is here: Horovod built for this launcher, NCCL for GPUs."""
    from dali_ba.distributed.launcher import MPI_RANK_VARIABLES, choose_engine
    from dali_ba.errors import UsageError

    horovod = found.facts["horovod"]
    try:
        choice = choose_engine(recipe.run.engine)
    except UsageError as exc:
        found.facts["engine"] = {"engine": None, "error": str(exc)}
        found.fail("engine", str(exc))
        return
    found.facts["engine"] = {"engine": choice.engine, "reason": choice.reason}
    gpu = bool(device and device.startswith("cuda"))
    if choice.engine == "horovod":
        under_mpi = any(os.environ.get(name, "").isdigit() for name in MPI_RANK_VARIABLES if name != "HOROVOD_RANK")
        if not horovod_works:
            found.fail(
                "horovod",
                f"Horovod is installed but import horovod.torch fails ({horovod.get('error')}) — rebuild "
                "it for this torch (launch/install.sh shows the flags), or launch with torchrun or a "
                "plain srun (the torch engine needs no Horovod)",
            )
        elif under_mpi and not horovod["mpi"]:
            found.fail(
                "horovod",
                "Horovod here is built without MPI, and an MPI launcher started this job — rebuild it "
                "with HOROVOD_WITH_MPI=1, launch with horovodrun --gloo, or use torchrun / plain srun",
            )
        elif not under_mpi and not horovod["gloo"]:
            found.fail(
                "horovod",
                "Horovod here is built without Gloo, which horovodrun --gloo needs — rebuild it with "
                "HOROVOD_WITH_GLOO=1, or launch with mpirun / srun --mpi=pmix",
            )
        elif gpu and not horovod["nccl"]:
            found.warn(
                "horovod",
                "Horovod here is built without NCCL: GPU gradients are averaged through MPI, slowly — "
                "rebuild it with HOROVOD_GPU_OPERATIONS=NCCL, or use --engine torch",
            )
    elif choice.engine == "torch":
        backends = found.facts.get("torch_backends", {})
        backend = "nccl" if gpu and not recipe.run.share_gpu else "gloo"
        if not backends.get(backend):
            found.fail(
                "engine",
                f"the torch engine needs torch.distributed's {backend.upper()} backend, which this torch "
                "lacks — install a torch build with it (PyPI's Linux wheels have both)",
            )
    elif not horovod_works and horovod.get("error"):
        found.warn(
            "horovod",
            f"Horovod is installed but import horovod.torch fails ({horovod['error']}) — rebuild it "
            "(launch/install.sh) or uninstall it; nothing needs it as one process or under torchrun",
        )


def check_mpi(found: Findings, launch: Launch) -> None:
    """mpi4py and the MPI library it loads (started by the doctor's own gather under MPI launchers;
    elsewhere asked in a child process, as initialising MPI under a plain srun aborts)."""
    try:
        import mpi4py
    except ImportError as exc:
        found.facts["mpi"] = None
        if launch.launcher == "mpi":
            found.fail(
                "mpi", f"mpi4py cannot be imported ({first_line(exc)}) — pip install mpi4py (built against this MPI)"
            )
        return
    found.facts["mpi4py"] = mpi4py.__version__
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        found.facts["mpi"] = mpi.Get_library_version().splitlines()[0].strip()
        return
    code = (
        "import mpi4py; mpi4py.rc.initialize = mpi4py.rc.finalize = False; from mpi4py import MPI; "
        "print(MPI.Get_library_version().splitlines()[0].strip())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    found.facts["mpi"] = done.stdout.strip() or None
    if done.returncode:
        found.warn(
            "mpi",
            f"mpi4py {mpi4py.__version__} cannot load its MPI library ({done.stderr.strip()[-200:]}) — "
            "reinstall mpi4py against this MPI (pip install --no-binary mpi4py mpi4py); the Horovod "
            "engine needs it",
        )


def check_cores(found: Findings) -> None:
    """The CPUs this rank may run on (rank 0 sets them against the node's ranks and --dali-threads)."""
    found.facts.update(cpus=sorted(os.sched_getaffinity(0)), node_cpus=os.cpu_count())


def check_slurm(found: Findings) -> None:
    from dali_ba.training.environment import SLURM_VARIABLES

    found.facts["slurm"] = {k: os.environ[k] for k in (*SLURM_VARIABLES, *SLURM_STEP_VARIABLES) if k in os.environ}
