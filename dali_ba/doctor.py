"""Pre-flight check of a cluster job: will dali-ba run here, on every node, with these flags?

    python -m dali_ba.doctor                                      # this machine
    srun --mpi=pmix python -m dali_ba.doctor --recipe R --train T --val V --output O
    mpirun -np 8 python -m dali_ba.doctor ...    # or horovodrun, torchrun, plain srun: as the trainer

A failed multi-node job is expensive, and most failures are environmental: a rank without a GPU, a
DALI or torch build the driver cannot load, Horovod built without MPI, a data path missing on one
node, an output folder that is not shared, too few cores for the DALI threads. Launched exactly as
training will be (it takes every training flag), every rank checks its own node and rank 0 prints one
table, a row per node (per rank where ranks differ), then each problem as one line: what is wrong,
then what to do. ``--json PATH`` also writes every rank's findings (rank 0).

Exit status: 0 when nothing found would stop a run (warnings, such as no hardware JPEG decoder, do
not), 1 when something would, 2 on bad flags. Every check's own failure is reported as a problem, so
every rank reaches the gather; a rank that never does (a hung file system) is named after
``--timeout`` seconds (under MPI launchers; torch.distributed then gives up without names).
"""
from __future__ import annotations

import configparser
import contextlib
import io
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from dali_ba.install_choice import (DRIVER_FLOOR, DriverTooOld, choose, dotted, driver_supports, installed_dali,
                                    read_driver, version_tuple)

PROG = "python -m dali_ba.doctor"
REPO_SETUP = Path(__file__).resolve().parents[1] / "setup.cfg"  # a source checkout's (editable installs too)
SLURM_STEP_VARIABLES = ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_CPUS_ON_NODE",
                        "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS")


# The supported versions: setup.cfg is the one place they are written ----------------------------------


def requirement_floors() -> dict[str, tuple[int, ...]]:
    """The oldest Python, torch, torchvision (and Horovod, an extra) dali-ba supports, from the checkout's
    setup.cfg where this runs from one, else from the installed package's metadata."""
    lines: list[str] = []
    config = configparser.ConfigParser(interpolation=None)
    if REPO_SETUP.is_file() and config.read(REPO_SETUP) and config.get("metadata", "name", fallback="") == "dali-ba":
        options = config["options"]
        lines = [f"python{options.get('python_requires', '')}", *options.get("install_requires", "").split("\n"),
                 *config["options.extras_require"].get("horovod", "").split("\n")]
    else:
        with contextlib.suppress(metadata.PackageNotFoundError):
            lines = [f"python{metadata.metadata('dali-ba').get('Requires-Python') or ''}",
                     *(metadata.requires("dali-ba") or [])]
    floors = {}
    for line in lines:
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", line.split(";")[0])
        if match:
            floors[match.group(1).lower()] = version_tuple(match.group(2))
    return floors


# What one rank finds ------------------------------------------------------------------------------------


@dataclass
class Problem:
    level: str  # fail: a run would stop; warn: it would run, worse
    check: str  # python, torch, gpu, dali, horovod, engine, mpi, cores, data, output, versions, ranks
    text: str  # what is wrong - what to do (no host or rank in it: the same problem on many ranks is one line)
    ranks: list[int] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)


class Findings:
    """One rank's facts (JSON-ready) and problems; a check that raises is itself a problem."""

    def __init__(self, rank: int, host: str) -> None:
        self.facts: dict[str, Any] = {"rank": rank, "host": host, "pid": os.getpid()}
        self.problems: list[Problem] = []

    def fail(self, check: str, text: str) -> None:
        self.problems.append(Problem("fail", check, text))

    def warn(self, check: str, text: str) -> None:
        self.problems.append(Problem("warn", check, text))

    @contextlib.contextmanager
    def checking(self, check: str):
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - whatever breaks, the rank still reaches the gather
            self.fail(check, f"the {check} check stopped with {type(exc).__name__}: {_first_line(exc)} — "
                             "fix what it names (a broken install?) and run the doctor again")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def check_python(found: Findings, floors: dict[str, tuple[int, ...]]) -> None:
    found.facts.update(python=platform.python_version(), executable=sys.executable)
    floor = floors.get("python")
    if floor and sys.version_info[:len(floor)] < floor:
        found.fail("python", f"Python {platform.python_version()} is older than {dotted(floor)}, the oldest dali-ba "
                             f"supports — use Python >= {dotted(floor)} (a new virtualenv)")


def check_torch(found: Findings, floors: dict[str, tuple[int, ...]]) -> bool:
    """torch and torchvision: importable, not older than the floors. Returns whether torch imports."""
    facts = found.facts
    for name in ("torch", "torchvision"):
        try:
            module = __import__(name)
        except Exception as exc:  # noqa: BLE001 - an ImportError, or a broken build's anything
            facts[name] = None
            found.fail("torch", f"{name} cannot be imported ({_first_line(exc)}) — install "
                                f"{name}>={dotted(floors.get(name, ()))} (see README, Installing on a cluster)")
            continue
        facts[name] = module.__version__
        floor = floors.get(name)
        if floor and version_tuple(module.__version__) < floor:
            found.fail("torch", f"{name} {module.__version__} is older than {dotted(floor)}, the oldest dali-ba "
                                f"supports — install {name}>={dotted(floor)}")
    if facts.get("torch") is None:
        return False
    import torch
    import torch.distributed as dist

    facts["torch_cuda"] = torch.version.cuda
    facts["torch_backends"] = {"nccl": dist.is_available() and dist.is_nccl_available(),
                               "gloo": dist.is_available() and dist.is_gloo_available()}
    return True


def check_gpu(found: Findings, driver: str | None, local_rank: int, recipe) -> str | None:
    """The driver, the GPUs torch sees and the one this rank will train on (as the trainer picks it);
    returns the device ('cuda:1', 'cpu')."""
    import torch

    from dali_ba.devices import gpu_placement, training_device

    facts = found.facts
    cuda = torch.version.cuda
    facts["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cuda and driver and not driver_supports(int(version_tuple(cuda)[0]), driver):
        found.fail("gpu", f"torch {torch.__version__} is built for CUDA {cuda}, which needs NVIDIA driver >= "
                          f"{dotted(DRIVER_FLOOR[version_tuple(cuda)[0]])}, and this node has {driver}: torch sees no GPU "
                          "— install a torch build for this driver's CUDA (download.pytorch.org's cu12x wheels: "
                          "TORCH_SPEC for launch/install.sh)")
    elif driver and not torch.cuda.is_available():
        if cuda is None:
            found.warn("gpu", f"torch {torch.__version__} is a CPU build, so this node's GPUs stay idle — install a CUDA "
                              "build of torch")
        else:
            found.warn("gpu", "nvidia-smi finds a GPU but torch sees none (CUDA_VISIBLE_DEVICES="
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}) — request GPUs for the tasks "
                              "(srun --gpus-per-task / --gpus-per-node)")
    device = training_device(local_rank)
    place = gpu_placement(device)
    facts.update(device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                 gpu_index=place.gpu_index, gpu_uuid=place.gpu_uuid, visible_gpus=place.visible_gpus)
    if device.type != "cuda":
        if recipe.data.decoder == "mixed":
            found.fail("gpu", "--decoder mixed needs a GPU and this rank sees none — use --decoder auto (or cpu), or "
                              "request GPUs")
        if recipe.model.amp == "fp16":
            found.fail("gpu", "--amp fp16 needs a GPU and this rank sees none — use --amp bf16 on CPU, or request GPUs")
    return str(device)


def check_dali(found: Findings, driver: str | None, gpu_index: int | None) -> None:
    """The DALI build installed, whether it imports and runs on this driver, and (on a GPU) whether
    its decoding library reaches the hardware JPEG decoder."""
    build = installed_dali()
    facts = found.facts["dali"] = {"package": build and build.package, "version": build and build.version,
                                   "cuda": build and build.cuda_major, "importable": False, "hardware_jpeg": None}
    try:
        choice = choose(driver).spec
    except DriverTooOld as exc:
        found.fail("dali", f"{exc}")
        choice = None
    try:
        import nvidia.dali
        import nvidia.dali.backend
    except Exception as exc:  # noqa: BLE001
        facts["error"] = _first_line(exc)
        found.fail("dali", f"NVIDIA DALI cannot be imported ({_first_line(exc)}) — pip install {choice or 'nvidia-dali'} "
                           "(bash launch/install.sh picks the build for the driver)")
        return
    facts.update(importable=True, version=nvidia.dali.__version__)
    if facts["cuda"] is None:  # no package metadata (DALI on PYTHONPATH): the CUDA it was built with
        facts["cuda"] = int(getattr(nvidia.dali.backend, "__cuda_version__", 0)) // 1000 or None
    if driver and facts["cuda"] and choice and not driver_supports(facts["cuda"], driver):
        found.fail("dali", f"{facts['package'] or 'DALI'} {facts['version']} is built for CUDA {facts['cuda']}, which needs "
                           f"NVIDIA driver >= {dotted(DRIVER_FLOOR[facts['cuda']])}, and this node has {driver} — "
                           f"pip uninstall -y {facts['package'] or 'nvidia-dali'} && pip install {choice} "
                           "(or run bash launch/install.sh here)")
        return
    if gpu_index is not None:
        facts["hardware_jpeg"], reason = hardware_jpeg(gpu_index)
        if not facts["hardware_jpeg"]:
            found.warn("dali", f"no hardware JPEG decoder on this GPU ({reason}): DALI decodes on the GPU's cores with "
                               "Huffman decoding on the CPU — runs, but needs more CPU per image: give ranks cores "
                               "to match --dali-threads")


def hardware_jpeg(gpu_index: int) -> tuple[bool, str]:
    """Whether nvImageCodec (the library DALI's mixed decoder uses) decodes a small JPEG with its
    hardware backend alone on GPU ``gpu_index`` (A100, H100 and others have such engines), and why not."""
    try:
        from nvidia import nvimgcodec as nv
    except ImportError as exc:
        return False, f"nvImageCodec does not import: {_first_line(exc)}"
    try:
        decoder = nv.Decoder(device_id=gpu_index, backends=[nv.Backend(nv.BackendKind.HW_GPU_ONLY)])
        images = decoder.decode([nv.CodeStream(small_jpeg())])
    except Exception as exc:  # noqa: BLE001
        return False, f"nvImageCodec's hardware backend failed: {_first_line(exc)}"
    return (True, "") if images and images[0] is not None else (False, "nvImageCodec's hardware backend decoded nothing")


def small_jpeg() -> bytes:
    """A 64x64 baseline 4:2:0 JPEG, made in memory."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((64, 64)).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def check_horovod(found: Findings, floors: dict[str, tuple[int, ...]]) -> bool:
    """Horovod's version and what it was built with (as horovodrun --check-build); returns whether
    ``import horovod.torch`` works."""
    from dali_ba.launcher import horovod_importable

    facts = found.facts["horovod"] = {"installed": horovod_importable()}
    if not facts["installed"]:
        return False
    try:
        import horovod
        import horovod.torch as hvd
    except Exception as exc:  # noqa: BLE001 - an undefined symbol of a build for another torch, say
        facts["error"] = _first_line(exc)
        return False
    facts.update(version=horovod.__version__, mpi=bool(hvd.mpi_built()), gloo=bool(hvd.gloo_built()),
                 nccl=bool(hvd.nccl_built()), cuda=bool(hvd.cuda_built()))
    floor = floors.get("horovod")
    if floor and version_tuple(horovod.__version__) < floor:
        found.warn("horovod", f"Horovod {horovod.__version__} is older than {dotted(floor)}, the oldest dali-ba is tested "
                              "with — build 0.28.1 (launch/install.sh shows how), or use the torch engine")
    return True


def check_engine(found: Findings, recipe, horovod_works: bool, device: str | None) -> None:
    """The engine ``--engine`` picks under this launcher (as the trainer decides it) and whether what
    it needs is here: Horovod built for this launcher, NCCL for GPUs."""
    from dali_ba.errors import UsageError
    from dali_ba.launcher import MPI_RANK_VARIABLES, choose_engine

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
            found.fail("horovod", f"Horovod is installed but import horovod.torch fails ({horovod.get('error')}) — rebuild "
                                  "it for this torch (launch/install.sh shows the flags), or launch with torchrun or a "
                                  "plain srun (the torch engine needs no Horovod)")
        elif under_mpi and not horovod["mpi"]:
            found.fail("horovod", "Horovod here is built without MPI, and an MPI launcher started this job — rebuild it "
                                  "with HOROVOD_WITH_MPI=1, launch with horovodrun --gloo, or use torchrun / plain srun")
        elif not under_mpi and not horovod["gloo"]:
            found.fail("horovod", "Horovod here is built without Gloo, which horovodrun --gloo needs — rebuild it with "
                                  "HOROVOD_WITH_GLOO=1, or launch with mpirun / srun --mpi=pmix")
        elif gpu and not horovod["nccl"]:
            found.warn("horovod", "Horovod here is built without NCCL: GPU gradients are averaged through MPI, slowly — "
                                  "rebuild it with HOROVOD_GPU_OPERATIONS=NCCL, or use --engine torch")
    elif choice.engine == "torch":
        backends = found.facts.get("torch_backends", {})
        backend = "nccl" if gpu and not recipe.run.share_gpu else "gloo"
        if not backends.get(backend):
            found.fail("engine", f"the torch engine needs torch.distributed's {backend.upper()} backend, which this torch "
                                 "lacks — install a torch build with it (PyPI's Linux wheels have both)")
    elif not horovod_works and horovod.get("error"):
        found.warn("horovod", f"Horovod is installed but import horovod.torch fails ({horovod['error']}) — rebuild it "
                              "(launch/install.sh) or uninstall it; nothing needs it as one process or under torchrun")


def check_mpi(found: Findings, launch) -> None:
    """mpi4py and the MPI library it loads (started by the doctor's own gather under MPI launchers;
    elsewhere asked in a child process, as initialising MPI under a plain srun aborts)."""
    try:
        import mpi4py
    except ImportError as exc:
        found.facts["mpi"] = None
        if launch.launcher == "mpi":
            found.fail("mpi", f"mpi4py cannot be imported ({_first_line(exc)}) — pip install mpi4py (built against this "
                              "MPI)")
        return
    found.facts["mpi4py"] = mpi4py.__version__
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        found.facts["mpi"] = mpi.Get_library_version().splitlines()[0].strip()
        return
    code = ("import mpi4py; mpi4py.rc.initialize = mpi4py.rc.finalize = False; from mpi4py import MPI; "
            "print(MPI.Get_library_version().splitlines()[0].strip())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    found.facts["mpi"] = done.stdout.strip() or None
    if done.returncode:
        found.warn("mpi", f"mpi4py {mpi4py.__version__} cannot load its MPI library ({done.stderr.strip()[-200:]}) — "
                          "reinstall mpi4py against this MPI (pip install --no-binary mpi4py mpi4py); the Horovod "
                          "engine needs it")


def check_cores(found: Findings) -> None:
    """The CPUs this rank may run on (rank 0 sets them against the node's ranks and --dali-threads)."""
    found.facts.update(cpus=sorted(os.sched_getaffinity(0)), node_cpus=os.cpu_count())


def check_slurm(found: Findings) -> None:
    from dali_ba.environment import SLURM_VARIABLES

    found.facts["slurm"] = {k: os.environ[k] for k in (*SLURM_VARIABLES, *SLURM_STEP_VARIABLES) if k in os.environ}


# Data and output: checked by the first rank of each node ------------------------------------------------


def check_data(found: Findings, recipe, wanted: dict[str, bool], world) -> None:
    """Each split asked for: indexed as training indexes it, and its first sample decoded as DALI's
    CPU decoder decodes it (Pillow where DALI does not import); then the checks that need the number
    of ranks (the batch per rank, memory for the views on this node)."""
    from dali_ba.checks import check_labels, check_world
    from dali_ba.errors import UsageError
    from dali_ba.recipe import effective

    loaded = {}
    for split in ("train", "val"):
        if wanted[split]:
            with found.checking("data"):
                loaded[split] = check_split(found, f"--{split}", getattr(recipe.data, split), loaded.get("train"),
                                            recipe.data.max_image_pixels)
    try:
        if loaded.get("train") and loaded.get("val"):
            check_labels(loaded["train"], loaded["val"])
        check_world(effective(recipe), world, *(d for d in loaded.values() if d))
    except UsageError as exc:  # a flag to change, named in the message
        found.fail("data", str(exc))


def check_split(found: Findings, flag: str, path: str, train, max_pixels: int):
    """One split: its dataset, or None after a problem naming the flag."""
    from dali_ba.check_data import size_problem
    from dali_ba.data.dataset import load_dataset
    from dali_ba.errors import UsageError

    facts = found.facts.setdefault("data", {})[flag.lstrip("-")] = {"path": path, "readable": False}
    started = time.perf_counter()
    try:
        dataset = load_dataset(path, classes=train.classes if train is not None else None)
    except UsageError as exc:
        facts["error"] = str(exc)
        found.fail("data", f"{flag} {path}: {exc} — make the data readable at this path on every node (a file system "
                           "all nodes mount, or a copy at the same path), or correct the flag")
        return None
    facts.update(readable=True, samples=len(dataset), classes=dataset.num_classes, sample=dataset.files[0],
                 index_seconds=round(time.perf_counter() - started, 3))
    try:
        data = dataset.read(0)
    except OSError as exc:
        found.fail("data", f"{flag} {path}: its first sample {dataset.files[0]} cannot be read ({exc.strerror or exc}) "
                           "— make the files readable on every node")
        return dataset
    problem = size_problem(io.BytesIO(data), max_pixels)
    decoder, shape, error = None, None, problem
    if not problem:
        decoder, shape, error = decode_sample(data)
    facts.update(decoded_by=decoder, shape=shape, decode_error=error)
    if error:
        found.warn("data", f"{flag} {path}: its first sample {dataset.files[0]} does not decode ({error}) — list every "
                           f"broken file with python -m dali_ba.check_data {path}")
    return dataset


def decode_sample(data: bytes) -> tuple[str, list[int] | None, str | None]:
    """Decode one encoded image as training's CPU path does (DALI's cpu decoder), or with Pillow where
    DALI does not import: (decoder, HWC shape, error)."""
    import numpy as np

    try:
        from nvidia.dali import fn, pipeline_def, types
    except Exception:  # noqa: BLE001 - reported by the DALI check
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return "Pillow", [image.height, image.width, len(image.getbands())], None
        except Exception as exc:  # noqa: BLE001
            return "Pillow", None, _first_line(exc)
    encoded = np.frombuffer(data, dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def decode():
        source = fn.external_source(source=lambda: [encoded], batch=True, dtype=types.UINT8)
        return fn.decoders.image(source, device="cpu", output_type=types.RGB)

    try:
        pipe = decode()
        pipe.build()
        (images,) = pipe.run()
        return "DALI cpu", list(np.asarray(images[0]).shape), None
    except Exception as exc:  # noqa: BLE001
        return "DALI cpu", None, _first_line(exc)


MARKER = ".dali-ba-doctor-{host}-{pid}"


def check_output(found: Findings, output: str, resume: str) -> None:
    """The output folder: not holding a run (unless resumed), creatable and writable here; a marker
    file written in it tells, after the next gather, which nodes see the same folder."""
    from dali_ba.checks import check_not_a_run
    from dali_ba.errors import UsageError

    path = Path(output)
    facts = found.facts["output"] = {"path": output, "absolute": str(path.absolute()), "writable": False,
                                     "created": [], "marker": None}
    try:
        check_not_a_run(path, resume)
    except UsageError as exc:
        found.fail("output", str(exc))
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        marker = path / MARKER.format(host=found.facts["host"], pid=os.getpid())
        marker.write_text("written by python -m dali_ba.doctor; removed when it ends\n")
    except OSError as exc:
        facts["error"] = exc.strerror or str(exc)
        found.fail("output", f"--output {output}: cannot create or write it here ({exc.strerror or exc}) — pick a "
                             "folder every node can write, on a file system they share")
        _remove_folders(missing)
        return
    facts.update(writable=True, created=[str(p) for p in missing], marker=marker.name)


def output_seen(output: str, markers: list[str | None]) -> list[str]:
    """The markers of ``markers`` (one per rank, None where a rank wrote none) visible here."""
    return [m for m in markers if m and (Path(output) / m).exists()]


def remove_marker(facts: dict[str, Any]) -> None:
    output = facts.get("output") or {}
    if output.get("marker"):
        with contextlib.suppress(OSError):
            (Path(output["path"]) / output["marker"]).unlink()


def _remove_folders(folders: list[Path]) -> None:
    """Folders the doctor created, deepest first, each only if empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


# The ranks: a gather that cannot hang on a lost rank ----------------------------------------------------


class PeersLost(Exception):
    """This rank cannot finish the gather: rank 0, or the transport, is gone."""


class Alone:
    """One process."""

    rank, size = 0, 1

    def allgather(self, value: Any) -> list[Any]:
        return [value]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 (None elsewhere), once rank 0 holds them all."""
        return [value]

    def end(self, status: int, missing: bool) -> None:
        """Leave (``missing``: some rank never reported)."""


class MpiPeers:
    """mpi4py point to point with a deadline (MPI launchers: mpirun, srun --mpi=pmix, horovodrun over
    MPI): rank 0 collects, then answers each rank; a rank that never reports is named, not waited for."""

    def __init__(self, timeout: float) -> None:
        from mpi4py import MPI

        self.MPI, self.comm, self.timeout, self.tag = MPI, MPI.COMM_WORLD, timeout, 0
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.lost: set[int] = set()  # ranks that missed a gather: not waited for again

    def allgather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` on every rank; None in place of a rank that did not report in time."""
        return self._collect(value, everyone=True)

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 (None elsewhere, after rank 0 has them all: the others get a
        short answer, not everyone's findings)."""
        result = self._collect(value, everyone=False)
        return result if self.rank == 0 else None

    def _collect(self, value: Any, everyone: bool) -> list[Any]:
        self.tag += 1
        comm, deadline, status = self.comm, time.monotonic() + self.timeout, self.MPI.Status()
        if self.rank != 0:
            sent = comm.isend(value, dest=0, tag=self.tag)
            while not comm.iprobe(source=0, tag=self.tag):
                if time.monotonic() > deadline:
                    raise PeersLost(f"rank 0 did not answer within --timeout {self.timeout:g} s")
                time.sleep(0.005)
            result = comm.recv(source=0, tag=self.tag)
            sent.wait()
            return result
        got = {0: value}
        while len(got) + len(self.lost) < self.size and time.monotonic() < deadline:
            if comm.iprobe(source=self.MPI.ANY_SOURCE, tag=self.tag, status=status):
                source = status.Get_source()
                message = comm.recv(source=source, tag=self.tag)
                if source not in self.lost:
                    got[source] = message
            else:
                time.sleep(0.005)
        self.lost |= set(range(self.size)) - set(got)
        result = [got.get(rank) for rank in range(self.size)]
        sends = [comm.isend(result if everyone else True, dest=rank, tag=self.tag) for rank in got if rank]
        while not self.MPI.Request.Testall(sends) and time.monotonic() < deadline + self.timeout:
            time.sleep(0.005)
        return result

    def end(self, status: int, missing: bool) -> None:
        if missing:  # a lost rank would hold MPI_Finalize for ever: end the job now
            sys.stdout.flush()
            self.comm.Abort(status or 1)


class WorldPeers:
    """The project's own :class:`~dali_ba.distributed.World`: torch.distributed over Gloo (torchrun, plain
    srun) or Horovod over Gloo (horovodrun --gloo), each bounded by its own timeout."""

    def __init__(self, world) -> None:
        self.world, self.rank, self.size = world, world.rank, world.size

    def allgather(self, value: Any) -> list[Any]:
        try:
            return self.world.gather(value)
        except Exception as exc:  # noqa: BLE001 - a collective timed out or a peer is gone
            raise PeersLost(f"not every rank reported ({_first_line(exc)})") from None

    def gather(self, value: Any) -> list[Any] | None:
        everyone = self.allgather(value)
        return everyone if self.rank == 0 else None

    def end(self, status: int, missing: bool) -> None:
        with contextlib.suppress(Exception):
            self.world.close()


def join(launch, timeout: float):
    """The gather for this launcher: mpi4py under MPI launchers (Horovod need not work for it),
    Horovod's Gloo under horovodrun --gloo, torch.distributed's Gloo under torchrun and plain srun."""
    from dali_ba.launcher import MPI_RANK_VARIABLES, EngineChoice

    if launch.size <= 1:
        return Alone()
    if launch.launcher == "mpi":
        if any(os.environ.get(name, "").isdigit() for name in MPI_RANK_VARIABLES if name != "HOROVOD_RANK"):
            return MpiPeers(timeout)
        from dali_ba.distributed import HorovodWorld

        return WorldPeers(HorovodWorld("horovodrun --gloo"))
    from dali_ba.distributed import TorchWorld

    choice = EngineChoice("torch", "the doctor's gather", launch)
    return WorldPeers(TorchWorld(choice, "cpu", timeout_s=timeout))


# Every rank's part ----------------------------------------------------------------------------------------


def examine(peers, recipe, wanted: dict[str, bool], hosts: list[str]) -> Findings:
    """All checks of this rank (the data and output ones on the first rank of each node)."""
    from dali_ba.distributed import World
    from dali_ba.launcher import detect_launch

    rank, host = peers.rank, hosts[peers.rank]
    local = [r for r, h in enumerate(hosts) if h == host]
    found = Findings(rank, host)
    launch = detect_launch()
    found.facts.update(launcher=launch.launcher, local_rank=local.index(rank), local_size=len(local),
                       first_on_node=local[0] == rank)
    floors = requirement_floors()
    found.facts["floors"] = {name: dotted(floor) for name, floor in floors.items()}
    with found.checking("python"):
        check_python(found, floors)
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


# Rank 0: what the ranks' findings add up to ----------------------------------------------------------------


def judge(ranks: list[dict | None], recipe, hosts: list[str]) -> list[Problem]:
    """Every rank's own problems, and those only the whole job shows: lost ranks, versions that differ,
    a GPU on some ranks only, two ranks on one GPU, too few cores per rank, data or an output folder
    that differs between nodes. Identical problems of many ranks become one."""
    from dali_ba.devices import GpuPlacement, gpu_sharing_error

    present = [r for r in ranks if r is not None]
    problems: list[Problem] = [Problem(**{**p, "ranks": [r["rank"]], "nodes": [r["host"]]}) for r in present
                               for p in r["problems"]]

    def add(level: str, check: str, text: str, where: list[dict]) -> None:
        problems.append(Problem(level, check, text, [r["rank"] for r in where], _unique(r["host"] for r in where)))

    missing = [rank for rank, r in enumerate(ranks) if r is None]
    if missing:
        problems.append(Problem("fail", "ranks", f"rank{'s' if len(missing) > 1 else ''} {_ranges(missing)} did not report "
                                "within --timeout (crashed, or a check hung there: a data path on a stalled file "
                                "system?) — see its own output; raise --timeout if its checks are merely slow",
                                missing, _unique(hosts[rank] for rank in missing)))
    horovod_engine = any((r.get("engine") or {}).get("engine") == "horovod" for r in present)
    for name, level in (("torch", "fail"), ("torchvision", "fail"), ("dali-ba", "fail"), ("python", "warn"),
                        ("dali", "warn"), ("horovod", "fail" if horovod_engine else "warn")):
        values: dict[str, list[dict]] = {}
        for r in present:
            values.setdefault(str(_version_of(r, name)), []).append(r)
        if len(values) > 1:
            spread = ", ".join(f"{value} on {', '.join(_unique(r['host'] for r in where))}"
                               for value, where in values.items())
            others = [r for where in list(values.values())[1:] for r in where]  # those unlike the first rank
            add(level, "versions", f"{name} differs between ranks ({spread}) — install one environment for every node "
                                   "(a virtualenv on the shared file system)", others)
    gpus = [r for r in present if str(r.get("device", "")).startswith("cuda")]
    if gpus and len(gpus) < len(present):
        add("fail", "gpu", "some ranks see no GPU while others train on one — request GPUs on every node "
                           "(--gpus-per-node), or run CPU-only everywhere (CUDA_VISIBLE_DEVICES=)",
            [r for r in present if r not in gpus])
    places = [GpuPlacement(r["host"], r.get("gpu_index"), r.get("gpu_uuid"), r.get("visible_gpus")) for r in present]
    sharing = gpu_sharing_error(places, recipe.run.share_gpu) if len(present) == len(ranks) else None
    if sharing:
        gpu_of = [(r["host"], r.get("gpu_uuid")) for r in present]
        add("fail", "gpu", sharing, [r for r, gpu in zip(present, gpu_of) if gpu[1] and gpu_of.count(gpu) > 1])
    threads = recipe.data.dali_threads
    shares = cores_per_rank(present)
    for cores in sorted({share for host in shares.values() for share in host.values() if share < threads}):
        add("warn", "cores", f"{cores} core{'s' if cores != 1 else ''} per rank for --dali-threads {threads} (DALI's "
                             "threads, and as many view threads on the CPU path) — give each rank more cores (srun "
                             "--cpus-per-task; mpirun binds a rank to one core unless told --bind-to none), or lower "
                             f"--dali-threads to {max(1, cores)}",
            [r for r in present if shares.get(r["host"], {}).get(r["rank"]) == cores])
    nodes = [r for r in present if r.get("first_on_node")]
    for split in ("train", "val"):
        counts = {r["host"]: r["data"][split]["samples"] for r in nodes
                  if (r.get("data") or {}).get(split, {}).get("readable")}
        if len(set(counts.values())) > 1:
            spread = ", ".join(f"{count} samples on {host}" for host, count in counts.items())
            add("fail", "data", f"--{split} differs between nodes ({spread}) — give every node the same data", nodes)
    blind = [r for r in nodes if (r.get("output") or {}).get("shared") is False]
    if blind:
        add("fail", "output", f"--output {blind[0]['output']['path']} here is not the folder rank 0 writes (its files "
                              "are not visible: a node-local disk?) — put --output on a file system every node shares",
            blind)
    return merge(problems)


def cores_per_rank(present: list[dict]) -> dict[str, dict[int, int]]:
    """host -> {rank: cores it can count on}: its own CPU set, or its share of the CPUs the node's
    ranks can use together, whichever is smaller."""
    out: dict[str, dict[int, int]] = {}
    for r in present:
        if "cpus" in r:
            node = {cpu for x in present if x["host"] == r["host"] for cpu in x.get("cpus", [])}
            out.setdefault(r["host"], {})[r["rank"]] = min(len(r["cpus"]), len(node) // max(1, r["local_size"]))
    return out


def mark_shared_output(ranks: list[dict | None]) -> None:
    """Set each node's ``output.shared``: whether it sees rank 0's marker, so the same folder (rank 0
    writes the checkpoints there, and every rank reads them on --resume). None: nothing to compare."""
    root = (ranks[0] or {}).get("output") or {}
    for r in ranks:
        output = (r or {}).get("output")
        if output and r.get("first_on_node"):
            output["shared"] = root["marker"] in output.get("sees", []) if root.get("marker") and output["writable"] else None


def merge(problems: list[Problem]) -> list[Problem]:
    """One problem per (level, check, text), with all its ranks and nodes; failures first."""
    merged: dict[tuple[str, str, str], Problem] = {}
    for p in problems:
        key = (p.level, p.check, p.text)
        if key in merged:
            merged[key].ranks = sorted(set(merged[key].ranks) | set(p.ranks))
            merged[key].nodes = _unique([*merged[key].nodes, *p.nodes])
        else:
            merged[key] = Problem(p.level, p.check, p.text, sorted(p.ranks), list(p.nodes))
    return sorted(merged.values(), key=lambda p: p.level != "fail")


def _version_of(r: dict, name: str) -> str | None:
    if name == "dali":
        dali = r.get("dali") or {}
        return f"{dali.get('package')} {dali.get('version')}" if dali.get("version") else None
    if name == "horovod":
        return (r.get("horovod") or {}).get("version")
    if name == "dali-ba":
        return r.get("dali_ba")
    return r.get(name)


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, rank in enumerate(ranks):
        if start is None:
            start = rank
        if i + 1 == len(ranks) or ranks[i + 1] != rank + 1:
            parts.append(f"{start}" if start == rank else f"{start}-{rank}")
            start = None
    return ",".join(parts)


# The report: a table, the problems, and the JSON -----------------------------------------------------------


COLUMNS = ("node", "ranks", "python", "torch", "torchvision", "DALI", "driver", "device", "HW JPEG", "Horovod", "engine",
           "MPI", "cores/rank", "train", "val", "output")


def cells(r: dict, node: dict, cores: int | None) -> dict[str, str]:
    """One rank's row of the table (data and output cells: its node's first rank's findings)."""
    dali, horovod, engine = r.get("dali") or {}, r.get("horovod") or {}, r.get("engine") or {}
    built = "+".join(name for name in ("MPI", "Gloo", "NCCL") if horovod.get(name.lower()))
    data = node.get("data") or {}
    output = node.get("output")

    def split(name: str) -> str:
        if name not in data:
            return "-"
        facts = data[name]
        if not facts["readable"]:
            return "MISSING"
        return f"{facts['samples']} {'ok' if not facts.get('decode_error') else 'bad sample'}"

    device = r.get("device") or "-"
    if device.startswith("cuda"):
        device = f"{device}/{r.get('visible_gpus')} {_short_gpu(r.get('gpu'))}"
    return {
        "python": r.get("python") or "-",
        "torch": r.get("torch") or "MISSING",
        "torchvision": (r.get("torchvision") or "MISSING").split("+")[0],
        "DALI": (f"{(dali.get('package') or 'nvidia-dali').removeprefix('nvidia-dali-')} {dali.get('version')}"
                 if dali.get("importable") else "MISSING" if not dali.get("package") else "BROKEN"),
        "driver": r.get("driver") or "none",
        "device": device,
        "HW JPEG": {True: "yes", False: "no", None: "-"}[dali.get("hardware_jpeg")],
        "Horovod": (f"{horovod['version']} {built or 'no MPI/Gloo'}" if horovod.get("version") else
                    "BROKEN" if horovod.get("error") else "none"),
        "engine": engine.get("engine") or "ERROR",
        "MPI": _short_mpi(r.get("mpi")),
        "cores/rank": str(cores) if cores is not None else "-",
        "train": split("train"),
        "val": split("val"),
        "output": "-" if output is None else ("NOT WRITABLE" if not output.get("writable") else
                                              "NOT SHARED" if output.get("shared") is False else "ok"),
    }


def _short_gpu(name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100'."""
    words = [w for w in (name or "").split() if w not in ("NVIDIA", "Tesla", "GeForce", "RTX")]
    return words[0] if words else ""


def _short_mpi(text: str | None) -> str:
    """'Open MPI v4.1.4, package: ...' -> 'Open MPI v4.1.4'."""
    return re.split(r"[,\t]", text)[0].strip()[:24] if text else "-"


def table(ranks: list[dict | None], hosts: list[str]) -> list[list[str]]:
    """Rows of the table: one per node, one per group of ranks within a node whose cells differ.
    Columns that say nothing anywhere (all '-') are left out."""
    present = [r for r in ranks if r is not None]
    first = {r["host"]: r for r in present if r.get("first_on_node")}
    shares = cores_per_rank(present)
    groups: dict[tuple, list[int]] = {}
    for r in present:
        row = cells(r, first.get(r["host"], {}), shares.get(r["host"], {}).get(r["rank"]))
        groups.setdefault((r["host"], *row.values()), []).append(r["rank"])
    rows = [[key[0], _ranges(sorted(members)), *key[1:]] for key, members in groups.items()]
    rows += [[hosts[rank], _ranges([rank]), *["(no report)"] + ["-"] * (len(COLUMNS) - 3)]
             for rank, r in enumerate(ranks) if r is None]
    keep = [i for i, name in enumerate(COLUMNS) if any(row[i] not in ("-", "") for row in rows) or i < 2]
    return [[COLUMNS[i] for i in keep], *[[row[i] for i in keep] for row in rows]]


def render(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def report(ranks: list[dict | None], problems: list[Problem], recipe, hosts: list[str]) -> list[str]:
    """What rank 0 prints: who is running, the table, the problems, the verdict."""
    present = [r for r in ranks if r is not None]
    root = ranks[0] or {}
    engine = root.get("engine") or {}
    nodes = _unique(r["host"] for r in present)
    lines = [f"dali-ba doctor: {len(ranks)} rank{'s' if len(ranks) != 1 else ''} on {len(nodes)} "
             f"node{'s' if len(nodes) != 1 else ''}; --engine {recipe.run.engine} -> {engine.get('engine') or 'ERROR'} "
             f"({engine.get('reason') or engine.get('error', '')}); --dali-threads {recipe.data.dali_threads}"]
    slurm = root.get("slurm") or {}
    if slurm.get("SLURM_JOB_ID"):
        lines.append("SLURM: " + ", ".join(f"{k.removeprefix('SLURM_').lower()} {v}" for k, v in slurm.items()))
    if root.get("launcher") == "none":
        lines.append("(one process: launch it as training will be, e.g. srun python -m dali_ba.doctor ..., to check "
                     "every node)")
    lines += ["", *render(table(ranks, hosts)), ""]
    for p in problems:
        where = f"{', '.join(p.nodes) or '?'} (rank{'s' if len(p.ranks) > 1 else ''} {_ranges(p.ranks)})"
        lines.append(f"{p.level.upper()}  {where}  {p.check}: {p.text}")
    fails = sum(p.level == "fail" for p in problems)
    warns = len(problems) - fails
    verdict = f"{fails} problem{'s' if fails != 1 else ''} would stop a run" if fails else "nothing found that would stop a run"
    if warns:
        verdict += f", {warns} warning{'s' if warns != 1 else ''}"
    return [*lines, *([""] if problems else []), f"doctor: {verdict}"]


# The command ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """0: nothing would stop a run; 1: something would; 2: bad flags."""
    if sys.version_info < (3, 11):  # dali_ba.recipe needs tomllib: say so before importing it
        print(f"{PROG}: error: Python {platform.python_version()} is older than 3.11, the oldest dali-ba supports — "
              "use Python >= 3.11", file=sys.stderr)
        return 1
    from dali_ba.errors import UsageError
    from dali_ba.launcher import detect_launch, launcher_rank
    from dali_ba.metrics import emit
    from dali_ba.recipe import build_parser, resolve

    parser = build_parser(PROG, __doc__.splitlines()[0])
    doctor = parser.add_argument_group("the doctor")
    doctor.add_argument("--json", metavar="PATH", help="rank 0 also writes every rank's findings and the problems here")
    doctor.add_argument("--timeout", type=float, default=300, metavar="S",
                        help="seconds to wait for every rank at each gather (default: %(default)s)")
    args = parser.parse_args(argv)
    given = {dest for dest, value in vars(args).items() if value is not None}
    wanted = {"train": bool(args.recipe) or "data.train" in given, "val": bool(args.recipe) or "data.val" in given,
              "output": bool(args.recipe) or "run.output" in given}
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
        except Exception as exc:  # noqa: BLE001 - mpi4py missing, a rendezvous that timed out, ...
            raise PeersLost(f"cannot join the other ranks ({type(exc).__name__}: {_first_line(exc)}) — under an MPI "
                            "launcher install mpi4py built against its MPI; under torchrun or a plain srun, check that "
                            "every task started and reaches the first node") from None
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
            _remove_folders([Path(p) for p in (facts.get("output") or {}).get("created", [])])
    except PeersLost as exc:
        emit(f"{PROG}: rank {launcher_rank()}: error: {exc}", sys.stderr)
        status = 1
    peers.end(status, ranks is not None and None in ranks)
    return status


def write_json(path: Path, ranks: list[dict | None], problems: list[Problem], status: int, hosts: list[str]) -> None:
    """Everything rank 0 knows, for scripts and tests: per node (data, output), the problems with
    their nodes and ranks, the table, and every rank's findings."""
    present = [r for r in ranks if r is not None]
    nodes = {r["host"]: {"ranks": [x["rank"] for x in present if x["host"] == r["host"]], "data": r.get("data"),
                         "output": r.get("output")} for r in present if r.get("first_on_node")}
    document = {"ok": status == 0, "exit_status": status, "ranks": len(ranks), "nodes": nodes,
                "problems": [asdict(p) for p in problems], "table": table(ranks, hosts),
                "per_rank": [r if r is not None else {"rank": rank, "host": hosts[rank], "missing": True}
                             for rank, r in enumerate(ranks)]}
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")


def _dali_ba_version() -> str:
    from dali_ba import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
