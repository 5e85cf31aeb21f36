"""The run's environment summary (environment.json): where every rank ran and with what."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import TYPE_CHECKING, Any

from dali_ba.distributed.launcher import detect_launch
from dali_ba.distributed.placement import gpu_placement
from dali_ba.install_choice import installed_dali
from dali_ba.loading.feed import DEFAULT_HW_DECODER_LOAD
from dali_ba.training.shared_index import index_role

if TYPE_CHECKING:
    import torch

    from dali_ba.distributed.world import World

PACKAGES = (
    "torch",
    "torchvision",
    "nvidia-dali",
    "horovod",
    "mpi4py",
    "numpy",
    "dali-ba",
)  # nvidia-dali: the build installed
SLURM_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_JOB_NAME",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_CPUS_PER_TASK",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_RESTART_COUNT",
    "SLURM_JOB_PARTITION",
    "SLURM_CLUSTER_NAME",
)


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        if name == "nvidia-dali":  # one package per CUDA major: name the one installed (nvidia-dali-cuda120, ...)
            dali = installed_dali()
            found[dali.package if dali else name] = dali.version if dali else None
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _mpi_library() -> str | None:
    """The MPI library in use, if this process uses MPI (the Horovod engine over MPI imported mpi4py).

    Never imported here: importing mpi4py.MPI initialises MPI, which aborts under a plain srun."""
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi.Get_library_version().splitlines()[0].strip() if mpi is not None else None


def environment_summary(
    world: World, device: torch.device, decoder: str, hw_decoder_load: float | None = DEFAULT_HW_DECODER_LOAD
) -> dict[str, Any]:
    """Collective: every rank's host, device and CPU share, plus versions and the SLURM job (rank 0's view).
    ``hw_decoder_load`` (the mixed decoder's share for the hardware JPEG decoder) is recorded with the
    decoder, null on the cpu decoder, which has no such split."""
    import torch

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    place = gpu_placement(device)  # which physical GPU: an index alone is per process under CUDA_VISIBLE_DEVICES
    me = {
        "rank": world.rank,
        **world.topology(),
        "launcher_local_rank": detect_launch().local_rank,
        "host": place.host,
        "pid": os.getpid(),
        "device": str(device),
        "gpu": gpu,
        "gpu_index": place.gpu_index,
        "gpu_uuid": place.gpu_uuid,
        "visible_gpus": place.visible_gpus,
        "cpus": len(os.sched_getaffinity(0)),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "index": index_role(),  # "listed" (rank 0) or "received" (over the engine: no listing of its own)
    }
    ranks = world.gather(me)
    return {
        "ranks": world.size,
        "engine": world.describe(),
        "nodes": sorted({r["host"] for r in ranks}),
        "gpus": sum(r["gpu"] is not None for r in ranks),
        "decoder": decoder,
        "hw_decoder_load": hw_decoder_load if decoder == "mixed" else None,
        "per_rank": ranks,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "mpi": _mpi_library(),
        "versions": _versions(),
        "slurm": {k: os.environ[k] for k in SLURM_VARIABLES if k in os.environ},
    }
