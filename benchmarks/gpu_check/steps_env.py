"""The GPU check's first steps: ``env`` (the machine, the versions, DALI's hardware JPEG decoder) and
``doctor`` (``python -m dali_ba.doctor`` on the machine, under a limit of its own)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

from benchmarks.gpu_check.context import Ctx, ensure_images, module_version, read_json
from benchmarks.gpu_check.processes import child_env, run_logged
from dali_ba.doctor import hardware_jpeg

# --- 1. environment -----------------------------------------------------------------------------------


def step_env(ctx: Ctx) -> int:
    """GPU, driver, library versions, and whether DALI's mixed decoder uses the hardware JPEG decoder."""
    import platform

    import torch
    import torchvision

    files = sorted(str(p) for p in ensure_images(ctx).rglob("*.jpg"))[: 8 * ctx.sizes.batch]  # forks: before CUDA
    r = ctx.result
    cuda = torch.cuda.is_available()
    m = r["machine"] = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if cuda else None,
        gpu_visible=cuda,
        cores=len(os.sched_getaffinity(0)),
    )
    if cuda:
        p = torch.cuda.get_device_properties(0)
        m.update(
            gpu=p.name,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            compute_capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
            gpus=torch.cuda.device_count(),
        )
    else:
        m["gpu"] = "no GPU"
    m.update(nvidia_smi())
    for name, module in (
        ("dali", "nvidia.dali"),
        ("nvimgcodec", "nvidia.nvimgcodec"),
        ("pytest", "pytest"),
        ("mpi4py", "mpi4py"),
        ("horovod", "horovod"),
        ("psutil", "psutil"),
    ):
        m[name] = module_version(module)
    m["tools"] = {tool: shutil.which(tool) for tool in ("nvidia-smi", "mpirun", "horovodrun", "make")}
    ctx.save()
    hardware_decoder(r.setdefault("hardware_decoder", {}), files, cuda, ctx.sizes.workers, ctx.save)
    ctx.save()
    return 0


def nvidia_smi() -> dict:
    """Name, driver and memory as nvidia-smi reports them (its absence is reported too)."""
    query = ("name", "driver_version", "memory.total")
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(query)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"nvidia_smi": f"not run: {exc}"}
    if done.returncode:
        return {"nvidia_smi": f"rc {done.returncode}: {(done.stdout + done.stderr).strip()[:300]}"}
    values = [v.strip() for v in done.stdout.splitlines()[0].split(",")]
    return {"nvidia_smi": dict(zip(query, values)), "driver": values[1]}


def hardware_decoder(out: dict, files: list[str], cuda: bool, threads: int, save: Callable[[], None]) -> None:
    """Evidence that DALI's mixed decoder runs on the hardware JPEG decoder (NVJPG engines): nvImageCodec
    (the library DALI decodes with) decoding with its hardware backend alone; DALI's mixed decoder with
    all work kept off the hardware (``hw_decoder_load=0``) against its default (0.65, what dali-ba uses),
    in images/s and CPU ms per image; and nvidia-smi's JPG-engine utilisation while the default runs.
    On the CPU (smoke) the same code runs with nvImageCodec's and DALI's CPU decoders. ``out`` is filled
    as it goes, and saved after each part, so that a step killed at its limit keeps what it measured."""
    out["files"] = len(files)
    out["nvimgcodec_backend"] = "hw_gpu_only" if cuda else "cpu_only"
    # In a child under a limit: a hardware engine in a bad state costs this step 20 s, not all of it.
    out["nvimgcodec_decoded"] = hardware_jpeg.decodes(0 if cuda else None, files[:64], timeout=20)
    save()
    if not cuda:
        out["dali_cpu"] = dali_decode_rate(files, "cpu", None, threads, 0.5)
        out["in_use"] = "no GPU"
        return
    out["dali_mixed_hw_load_0"] = dali_decode_rate(files, "mixed", 0.0, threads, 3.0)
    save()
    with JpgUtilisation(samples=3) as jpg:  # dali-ba's default, set explicitly: DALI's own changed between releases
        out["dali_mixed_default"] = dali_decode_rate(files, "mixed", default_hw_decoder_load(), threads, 4.0)
    out["nvidia_smi_jpg_utilisation"] = jpg.samples
    hw_works = isinstance(out["nvimgcodec_decoded"], int) and out["nvimgcodec_decoded"] > 0
    busy = any(v > 0 for v in jpg.samples) if jpg.samples else None
    off, on = out["dali_mixed_hw_load_0"], out["dali_mixed_default"]
    both = "cpu_ms_per_image" in on and "cpu_ms_per_image" in off
    cpu_saving = on["cpu_ms_per_image"] / off["cpu_ms_per_image"] if both else None
    out["cpu_ms_default_over_load_0"] = cpu_saving
    # The JPG engines' utilisation is direct evidence; without it, a default run that needs much less
    # CPU per image than the run kept off the hardware (Huffman decoding done on the CPU) is.
    out["in_use"] = bool(hw_works and (busy if busy is not None else (cpu_saving is not None and cpu_saving < 0.7)))
    out["evidence"] = (
        "nvidia-smi JPG utilisation" if busy is not None else "CPU per image, default vs hw_decoder_load=0"
    )


def default_hw_decoder_load() -> float:
    """dali-ba's ``hw_decoder_load`` (0.65 where this checkout does not name it)."""
    import dali_ba.loading.loader

    return getattr(dali_ba.loading.loader, "DEFAULT_HW_DECODER_LOAD", 0.65)


def dali_decode_rate(files: list[str], device: str, hw_load: float | None, threads: int, seconds: float) -> dict:
    """DALI's file reader + image decoder alone for ``seconds``: images/s and CPU ms per image (this process)."""
    import torch
    from nvidia.dali import fn, pipeline_def, types

    options = {} if hw_load is None else {"hw_decoder_load": hw_load}

    @pipeline_def(batch_size=64, num_threads=threads, device_id=0 if device == "mixed" else None)
    def decode():
        jpegs, _ = fn.readers.file(files=files, labels=list(range(len(files))), random_shuffle=False)
        return fn.decoders.image(jpegs, device=device, output_type=types.RGB, **options)

    try:
        pipe = decode()
        pipe.build()
        pipe.run()  # warm-up: allocations, the decoder's start
        images, cpu, start = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - start < seconds:
            pipe.run()
            images += 64
        if device == "mixed":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        return dict(
            hw_decoder_load=hw_load if hw_load is not None else "default",
            images=images,
            images_per_s=images / wall,
            cpu_ms_per_image=1e3 * cpu / images,
            cores_busy=cpu / wall,
        )
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


class JpgUtilisation:
    """``nvidia-smi dmon`` in the background: the JPG engines' utilisation (%), once a second ``samples``
    times (it ends by itself, so its output is flushed: the block must last longer)."""

    def __init__(self, samples: int) -> None:
        self.count, self._process = samples, None
        self.samples: list[int] = []

    def __enter__(self) -> JpgUtilisation:
        try:
            self._process = subprocess.Popen(
                ["nvidia-smi", "dmon", "-s", "u", "-d", "1", "-c", str(self.count)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self._process is None:
            return
        try:
            text = self._process.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            self._process.kill()
            text = self._process.communicate()[0]
        header = next((line[1:].split() for line in text.splitlines() if line.startswith("#") and "jpg" in line), None)
        if header is None:
            return
        column = header.index("jpg")
        for line in text.splitlines():
            fields = line.split()
            if not line.startswith("#") and len(fields) > column and fields[column].isdigit():
                self.samples.append(int(fields[column]))


# --- 2. the doctor ----------------------------------------------------------------------------------------


def step_doctor(ctx: Ctx) -> int:
    """``python -m dali_ba.doctor`` on this machine, under this step's own limit: its GPU paths (driver
    rule, hardware JPEG probe, the GPU a rank takes) have only run on stand-ins elsewhere. Its report
    goes to doctor.json and doctor.txt; the result keeps its exit status, verdict line and problems.
    Exit 0 when the doctor found nothing that would stop a run."""
    report = ctx.dir / "doctor.json"
    command = [sys.executable, "-m", "dali_ba.doctor", "--dali-threads", "1", "--json", str(report)]
    ctx.result["doctor"] = dict(status="running")  # what a kill of the whole step leaves
    ctx.save()
    log = ctx.dir / "doctor.txt"
    rc, seconds = run_logged(command, log, ctx.left(), child_env())  # its whole tree killed at the limit
    found = read_json(report) or {}
    lines = log.read_text(errors="replace").splitlines()
    verdict = next((line.strip() for line in reversed(lines) if line.startswith("doctor:")), None)
    ctx.result["doctor"] = dict(
        status="timed out" if rc is None else "finished",
        rc=rc,
        seconds=round(seconds, 1),
        verdict=verdict,
        ok=found.get("ok"),
        problems=[f"{p['level']} {p['check']}: {p['text']}" for p in found.get("problems", [])],
    )
    ctx.save()
    return 0 if rc == 0 else 1
