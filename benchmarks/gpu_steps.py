"""The steps of the GPU check (benchmarks/gpu_check.py), one per process:

    python benchmarks/gpu_steps.py STEP --dir DIR --work WORK [--limit SECONDS] [--smoke]

Each step writes DIR/result.json as it goes (a step killed at its limit still leaves what it had)
and exits 0 only when everything it ran worked; a missed performance target is not a failure (the
driver judges targets). ``--smoke`` runs the same code on the CPU at the sizes of :data:`SMOKE`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from gpu_check import REPO, child_env, kill_tree, run_logged

CPU_DEMO_TOP1 = 84.5  # README, Measured: make demo (2 ranks, 2 CPU cores) reached top-1 84.5 %
TESTS = ("test_loader.py", "test_odd_files.py", "test_bad_files.py", "test_evaluation.py", "test_resume.py",
         "test_train.py", "test_step.py")  # the GPU-relevant ones, most telling first
SMOKE_TESTS = ("test_train_batch_shapes_dtypes_and_layout", "test_bad_loader_arguments",
               "test_eval_views_average_the_softmax_over_the_views", "test_lr_schedule_warms_up_then_decays")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    images: int  # unique ImageNet-like JPEGs made (~500x375, ~110 KB)
    copies: int  # hard links of each: longer epochs at no cost of making them
    batch: int  # B of the loader comparison and of Figure 5 (one GPU)
    view_size: int
    views: tuple[int, ...]  # M
    workers: int  # torchvision DataLoader workers, and DALI threads in the loader comparison
    loader_epochs: int  # timed epochs per (method, M), after a warm-up one
    epoch_seconds: float  # a timed epoch stops after this long (the slow peers' whole epochs would not fit)
    demo_per_class: tuple[int, int]  # demo data: training and validation images per class
    demo_args: tuple[str, ...]  # flags added to the demo recipe's trainings
    resume_args: tuple[str, ...]  # flags of the three resume runs: short, with 10+ steps per epoch, so that the
    # stop (the ranks agree on one after an epoch's first step and every 5 steps) falls mid-epoch
    arch: str  # Figure 5's model
    steps: int  # profile step: timed steps, after `warmup`, with `cache` batches in memory
    warmup: int
    cache: int
    views_steps: int  # profile views: timed steps per M (a shorter repeat of Figure 5)


FULL = Sizes(images=2048, copies=4, batch=64, view_size=224, views=(1, 4, 10), workers=16, loader_epochs=2,
             epoch_seconds=2.0, demo_per_class=(64, 20), demo_args=(),
             resume_args=("--epochs", "2", "--batch-size", "16", "--log-every", "1"), arch="resnet50",
             steps=30, warmup=8, cache=8, views_steps=15)
SMOKE = Sizes(images=24, copies=2, batch=8, view_size=32, views=(1, 4, 10), workers=2, loader_epochs=1,
              epoch_seconds=1.0, demo_per_class=(8, 2),
              demo_args=("--epochs", "1", "--batch-size", "16", "--views", "2", "--timing-warmup", "1"),
              resume_args=("--epochs", "1", "--batch-size", "8", "--views", "2", "--log-every", "1"), arch="resnet20",
              steps=3, warmup=1, cache=2, views_steps=2)


@dataclass
class Ctx:
    """One step's run: its folder (log, result.json, raw outputs: all archived), the shared scratch
    folder (data, trainings: not archived), its sizes and its deadline."""

    smoke: bool
    dir: Path
    work: Path
    deadline: float
    result: dict = field(default_factory=dict)

    @property
    def sizes(self) -> Sizes:
        return SMOKE if self.smoke else FULL

    def left(self, reserve: float = 3.0) -> float:
        """Seconds left for a sub-run, keeping ``reserve`` to write the result."""
        return max(1.0, self.deadline - time.time() - reserve)

    def save(self) -> None:
        path = self.dir / "result.json"
        path.with_suffix(".partial").write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        os.replace(path.with_suffix(".partial"), path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def ensure_images(ctx: Ctx) -> Path:
    """The ImageNet-like training folder, made once for every step that needs it (in parallel)."""
    root = ctx.work / "imagenet_like"
    if (root / ".complete").exists():
        return root / "train"
    shutil.rmtree(root, ignore_errors=True)
    workers = min(16, len(os.sched_getaffinity(0)))
    counts = [ctx.sizes.images // workers + (k < ctx.sizes.images % workers) for k in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make_part, [(root / "parts" / str(k), count, k) for k, count in enumerate(counts) if count]))
    for path in sorted((root / "parts").rglob("*.jpg")):
        folder = root / "train" / path.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        for copy in range(ctx.sizes.copies):
            os.link(path, folder / f"{path.parent.parent.name}_{copy}_{path.name}")
    (root / ".complete").touch()
    return root / "train"


def _make_part(job: tuple[Path, int, int]) -> None:
    from make_images import IMAGENET_LIKE, write_images

    folder, count, seed = job
    write_images(folder, count, seed, **IMAGENET_LIKE)


# --- 1. environment -----------------------------------------------------------------------------------


def step_env(ctx: Ctx) -> int:
    """GPU, driver, library versions, and whether DALI's mixed decoder uses the hardware JPEG decoder."""
    import platform

    import torch
    import torchvision

    files = sorted(str(p) for p in ensure_images(ctx).rglob("*.jpg"))[: 8 * ctx.sizes.batch]  # forks: before CUDA
    r = ctx.result
    cuda = torch.cuda.is_available()
    m = r["machine"] = dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                            torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if cuda else None,
                            gpu_visible=cuda, cores=len(os.sched_getaffinity(0)))
    if cuda:
        p = torch.cuda.get_device_properties(0)
        m.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), compute_capability=f"{p.major}.{p.minor}",
                 multiprocessors=p.multi_processor_count, gpus=torch.cuda.device_count())
    else:
        m["gpu"] = "no GPU"
    m.update(nvidia_smi())
    for name, module in (("dali", "nvidia.dali"), ("nvimgcodec", "nvidia.nvimgcodec"), ("pytest", "pytest"),
                         ("mpi4py", "mpi4py"), ("horovod", "horovod"), ("psutil", "psutil")):
        m[name] = module_version(module)
    m["tools"] = {tool: shutil.which(tool) for tool in ("nvidia-smi", "mpirun", "horovodrun", "make")}
    ctx.save()
    r["hardware_decoder"] = hardware_decoder(files, cuda, ctx.sizes.workers)
    ctx.save()
    r["doctor"] = doctor(ctx)
    ctx.save()
    return 0


def doctor(ctx: Ctx) -> dict:
    """``python -m dali_ba.doctor`` on this machine: its GPU paths (driver rule, hardware JPEG probe,
    the GPU a rank takes) have only run on stand-ins elsewhere. Its report goes to doctor.json."""
    report = ctx.dir / "doctor.json"
    command = [sys.executable, "-m", "dali_ba.doctor", "--dali-threads", "1", "--json", str(report)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=min(30.0, ctx.left()))
    except subprocess.TimeoutExpired:
        return dict(status="timed out")
    (ctx.dir / "doctor.txt").write_text(done.stdout + done.stderr)
    found = read_json(report) or {}
    return dict(status=done.returncode, problems=[f"{p['level']} {p['check']}: {p['text']}" for p in found.get("problems", [])])


def module_version(name: str) -> str | None:
    """The module's version, or None where it does not import (and so is not there)."""
    import importlib

    try:
        return str(getattr(importlib.import_module(name), "__version__", "?"))
    except Exception:
        return None


def nvidia_smi() -> dict:
    """Name, driver and memory as nvidia-smi reports them (its absence is reported too)."""
    query = ("name", "driver_version", "memory.total")
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(query)}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"nvidia_smi": f"not run: {exc}"}
    if done.returncode:
        return {"nvidia_smi": f"rc {done.returncode}: {(done.stdout + done.stderr).strip()[:300]}"}
    values = [v.strip() for v in done.stdout.splitlines()[0].split(",")]
    return {"nvidia_smi": dict(zip(query, values)), "driver": values[1]}


def hardware_decoder(files: list[str], cuda: bool, threads: int) -> dict:
    """Evidence that DALI's mixed decoder runs on the hardware JPEG decoder (NVJPG engines): nvImageCodec
    (the library DALI decodes with) decoding with its hardware backend alone; DALI's mixed decoder with
    all work kept off the hardware (``hw_decoder_load=0``) against its default (0.65, what dali-ba uses),
    in images/s and CPU ms per image; and nvidia-smi's JPG-engine utilisation while the default runs.
    On the CPU (smoke) the same code runs with nvImageCodec's and DALI's CPU decoders."""
    out: dict = {"files": len(files)}
    out["nvimgcodec_backend"] = "hw_gpu_only" if cuda else "cpu_only"
    out["nvimgcodec_decoded"] = nvimgcodec_decodes(files[:64], hardware=cuda)
    if not cuda:
        out["dali_cpu"] = dali_decode_rate(files, "cpu", None, threads, 0.5)
        out["in_use"] = "no GPU"
        return out
    out["dali_mixed_hw_load_0"] = dali_decode_rate(files, "mixed", 0.0, threads, 3.0)
    with JpgUtilisation(samples=3) as jpg:
        out["dali_mixed_default"] = dali_decode_rate(files, "mixed", None, threads, 4.0)
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
    out["evidence"] = "nvidia-smi JPG utilisation" if busy is not None else "CPU per image, default vs hw_decoder_load=0"
    return out


def nvimgcodec_decodes(files: list[str], hardware: bool) -> int | str:
    """How many of ``files`` nvImageCodec decodes with its hardware backend only (CPU backend on the smoke)."""
    try:
        from nvidia import nvimgcodec as nv

        if hardware:
            decoder = nv.Decoder(backends=[nv.Backend(nv.BackendKind.HW_GPU_ONLY)])
        else:
            decoder = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.BackendKind.CPU_ONLY)])
        images = decoder.decode([nv.CodeStream(Path(f).read_bytes()) for f in files])
        return sum(image is not None for image in images)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]


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
        return dict(hw_decoder_load=hw_load if hw_load is not None else "default", images=images,
                    images_per_s=images / wall, cpu_ms_per_image=1e3 * cpu / images, cores_busy=cpu / wall)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


class JpgUtilisation:
    """``nvidia-smi dmon`` in the background: the JPG engines' utilisation (%), once a second ``samples``
    times (it ends by itself, so its output is flushed: the block must last longer)."""

    def __init__(self, samples: int) -> None:
        self.count, self._process = samples, None
        self.samples: list[int] = []

    def __enter__(self) -> "JpgUtilisation":
        try:
            self._process = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1", "-c", str(self.count)],
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
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


# --- 2. tests -------------------------------------------------------------------------------------------


def step_tests(ctx: Ctx) -> int:
    """The GPU-relevant test files in one pytest process, on CUDA where a GPU is visible (the loaders pick
    the mixed decoder). Tests whose launchers are not installed are deselected, and named."""
    import importlib.util

    files = list(TESTS)
    deselected = {"make_demo": "runs make demo (installs a virtualenv, 2 Horovod ranks)"}
    if importlib.util.find_spec("horovod") is None:
        files.remove("test_step.py")  # imports Horovod at the top
        deselected.update(horovodrun="Horovod is not installed", more_ranks_than_samples="uses horovodrun",
                          **{"test_step.py": "imports Horovod"})
    if shutil.which("mpirun") is None:
        deselected.update(mpirun="mpirun is not installed", signal_to_one_rank="uses mpirun")
    select = " and ".join(f"not {name}" for name in deselected if not name.endswith(".py"))
    if ctx.smoke:
        select = f"({' or '.join(SMOKE_TESTS)}) and {select}"
    report = ctx.dir / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE", "--maxfail=5",
           f"--junitxml={report}", "-k", select, *[f"tests/{name}" for name in files]]
    ctx.result.update(files=files, deselected=deselected, select=select, cuda=gpu())
    ctx.save()
    log = ctx.dir / "pytest.log"
    rc, seconds = run_logged(cmd, log, ctx.left())
    outcomes = read_outcomes(log.read_text(errors="replace"))
    counts = {kind: sum(1 for v in outcomes.values() if v == kind) for kind in sorted(set(outcomes.values()))}
    ctx.result.update(rc=rc, seconds=round(seconds, 1), counts=counts,
                      failed=[name for name, kind in outcomes.items() if kind in ("FAILED", "ERROR")],
                      timed_out=rc is None)
    ctx.save()
    return 0 if rc == 0 else 1


def read_outcomes(log: str) -> dict[str, str]:
    """{test id: PASSED/FAILED/ERROR/SKIPPED/...} from pytest -v lines (also from a log cut short)."""
    outcomes = {}
    for line in log.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"):
            outcomes[parts[0]] = parts[1] if parts[0] not in outcomes or parts[1] == "ERROR" else outcomes[parts[0]]
    return outcomes


# --- 3. the demo recipe ---------------------------------------------------------------------------------


def step_demo(ctx: Ctx) -> int:
    """The demo recipe trained on this machine, all runs at once: bf16; fp16 with --chunks 2 (bf16 on the
    CPU, where fp16 is refused); --engine torch (NCCL on a GPU, one rank); and exact mid-epoch resume:
    two uninterrupted runs (is training deterministic here?) and one stopped by SIGUSR1, resumed."""
    from dali_ba.data.synth import write_dataset

    data = write_dataset(ctx.work / "demo", *ctx.sizes.demo_per_class, seed=0)
    cuda = gpu()
    runs = {
        "bf16": ctx.sizes.demo_args + ("--amp", "bf16"),
        "fp16_chunks2": ctx.sizes.demo_args + ("--amp", "fp16" if cuda else "bf16", "--chunks", "2"),
        "torch_engine": ctx.sizes.demo_args + ("--engine", "torch", "--amp", "bf16"),
        "resume_reference": ctx.sizes.resume_args,
        "resume_reference_again": ctx.sizes.resume_args,
        "resume_stopped": ctx.sizes.resume_args,
    }
    root = ctx.work / "demo_runs"
    root.mkdir(parents=True, exist_ok=True)  # made here: a trainer removes the folders its --output probe made
    outputs = {name: root / name for name in runs}
    started = {name: Training(train_command(data, outputs[name], flags), ctx.dir / f"{name}.log")
               for name, flags in runs.items()}
    stop = stop_mid_epoch(started["resume_stopped"], outputs["resume_stopped"], ctx)
    resumed = None
    if stop.get("rc") == 75:
        command = train_command(data, outputs["resume_stopped"], runs["resume_stopped"] + ("--resume", "auto"))
        resumed = Training(command, ctx.dir / "resume_stopped.log")
    for training in [*started.values(), resumed]:
        if training is not None:
            training.wait(ctx.deadline - 3)
    r = ctx.result
    r["runs"] = {name: dict(flags=" ".join(runs[name]), rc=started[name].rc, seconds=started[name].seconds,
                            **run_summary(outputs[name])) for name in runs}
    r["runs"]["resume_stopped"]["rc_after_resume"] = resumed.rc if resumed else None
    for name in runs:  # the checkpoints and models stay in the scratch folder; the metrics are archived
        if (outputs[name] / "metrics.jsonl").exists():
            shutil.copy(outputs[name] / "metrics.jsonl", ctx.dir / f"{name}.metrics.jsonl")
    r["resume"] = resume_verdict(outputs, stop)
    top1 = r["runs"]["bf16"].get("top1")
    r["accuracy"] = dict(gpu_bf16_top1=top1, cpu_demo_top1=CPU_DEMO_TOP1,
                         difference=None if top1 is None else round(top1 - CPU_DEMO_TOP1, 2))
    ctx.save()
    expected = {name: 75 if name == "resume_stopped" else 0 for name in runs}
    ok = all(started[name].rc == expected[name] for name in runs) and resumed is not None and resumed.rc == 0
    return 0 if ok and r["resume"]["exact"] is not False else 1


def train_command(data: Path, output: Path, flags: Iterable[str]) -> list[str]:
    return [sys.executable, "-m", "dali_ba.train", "--recipe", "pipelines/demo.toml", "--train", str(data / "train"),
            "--val", str(data / "val"), "--output", str(output), *flags]


class Training:
    """A training started in the background, its output to ``log``."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.start, self.rc, self.seconds, self.finished = time.perf_counter(), None, None, False
        with open(log, "ab") as out:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=child_env())

    def wait(self, deadline: float) -> int | None:
        """Its exit code, or None after killing it at ``deadline`` (time.time())."""
        if self.finished:
            return self.rc
        try:
            self.rc = self.process.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            kill_tree(self.process.pid)
            self.process.wait()
        self.seconds, self.finished = round(time.perf_counter() - self.start, 1), True
        return self.rc


def records(output: Path, kind: str) -> list[dict]:
    try:
        lines = (output / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return [r for r in parsed if r.get("kind") == kind]


def stop_mid_epoch(training: Training, output: Path, ctx: Ctx) -> dict:
    """SIGUSR1 once the run has logged a step; the trainer finishes the step, checkpoints, exits 75."""
    while time.time() < ctx.deadline - 10 and training.process.poll() is None and not records(output, "step"):
        time.sleep(0.01)
    if training.process.poll() is not None:
        return {"rc": training.wait(ctx.deadline), "error": "the run ended before it could be stopped"}
    os.kill(training.process.pid, signal.SIGUSR1)
    rc = training.wait(ctx.deadline - 5)
    stops, start = records(output, "stop"), records(output, "start")
    steps_per_epoch = start[0].get("steps_per_epoch") if start else None
    step = stops[0]["step"] if stops else None
    return dict(rc=rc, step=step, steps_per_epoch=steps_per_epoch,
                mid_epoch=None if not (step and steps_per_epoch) else step % steps_per_epoch != 0)


def run_summary(output: Path) -> dict:
    """What a run's records say: device, decoder, engine, accuracy, throughput, parameter digest."""
    start, summary = records(output, "start"), records(output, "summary")
    keys = ("device", "decoder", "engine", "engine_backend", "steps_per_epoch")
    out = {key: start[0].get(key) for key in keys} if start else {}
    if summary:
        s = summary[-1]
        out.update({key: s.get(key) for key in ("top1", "top5", "steps_per_s", "images_per_s", "wall_time",
                                                 "params_identical")}, digest=json.dumps(s.get("param_digests")))
    return out


def resume_verdict(outputs: dict[str, Path], stop: dict) -> dict:
    """Stopped + resumed against uninterrupted: bit-identical parameters, or how far apart (and how far
    apart two uninterrupted runs are: GPU kernels need not be deterministic)."""
    digests = {name: run_summary(outputs[name]).get("digest") for name in
               ("resume_reference", "resume_reference_again", "resume_stopped")}
    verdict = dict(stop=stop, deterministic=None, exact=None)
    if None in digests.values():
        return dict(verdict, note="a run has no summary")
    verdict["deterministic"] = digests["resume_reference"] == digests["resume_reference_again"]
    verdict["exact"] = digests["resume_stopped"] == digests["resume_reference"]
    if not verdict["exact"]:
        verdict["max_abs_difference_resumed"] = max_difference(outputs["resume_reference"], outputs["resume_stopped"])
        verdict["max_abs_difference_run_to_run"] = max_difference(outputs["resume_reference"],
                                                                  outputs["resume_reference_again"])
        if not verdict["deterministic"]:
            verdict["exact"] = None  # undecidable bit for bit: training itself is not deterministic here
    return verdict


def max_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two runs' final parameters and buffers (model.pt)."""
    import torch

    left, right = (torch.load(p / "model.pt", map_location="cpu", weights_only=True) for p in (a, b))
    return max(float((left[k].double() - right[k].double()).abs().max()) for k in left if left[k].numel())


# --- 4. the loader alone --------------------------------------------------------------------------------

METHODS = {"a": "dali-ba (decoder auto: mixed on a GPU)", "c": "torchvision DataLoader: decode_jpeg + v2, uint8",
           "g": "torchvision on the device: decode_jpeg(device) + v2", "f": "DALI decode alone (ceiling)"}


def step_loader(ctx: Ctx) -> int:
    """dali-ba against a tuned torchvision DataLoader, torchvision's own GPU decode + v2 on the GPU, and
    DALI's decode alone (the ceiling), on the ImageNet-like JPEGs, M = 1, 4, 10 (benchmarks/peers.py's
    timing: a warm-up epoch per case, then timed epochs round-robin). Each epoch stops after
    ``epoch_seconds``. Rates are per method's fastest epoch; ``running`` rates leave out each epoch's
    start (a DALI pipeline built or reset, a prefetch queue refilled), which an ImageNet epoch of
    20,000 batches amortises."""
    import torch
    from peers import run_epoch

    from dali_ba.data.dataset import load_dataset

    dataset = load_dataset(ensure_images(ctx))
    s = ctx.sizes
    torch.set_num_threads(s.workers)
    # The DataLoaders first: their workers fork before this process starts CUDA (DALI, the GPU peer).
    cases = [("c", v) for v in s.views] + [(m, v) for v in s.views for m in "ag"] + [("f", s.views[0])]
    ctx.result.update(files=len(dataset), batch=s.batch, view_size=s.view_size, workers=s.workers,
                      epoch_seconds=s.epoch_seconds, methods=METHODS, results=[])
    runners, epochs = {}, {case: [] for case in cases}
    for case in cases:
        print(f"warm-up {case}", flush=True)
        runners[case] = make_method(*case, dataset, s)
        run_epoch(runners[case], 0)
    ctx.result["cuda"] = gpu()
    for round_ in range(s.loader_epochs):
        for case in cases:
            epochs[case].append(run_epoch(runners[case], 1 + round_))
            e = epochs[case][-1]
            print(f"round {round_ + 1} {case}: {e['batches'] * s.batch / e['seconds']:.0f} samples/s, "
                  f"{e['cpu_seconds'] / e['seconds']:.1f} cores", flush=True)
        ctx.result["results"] = [summary(*case, epochs[case], s.batch) for case in cases if epochs[case]]
        ctx.save()
    return 0


def make_method(method: str, views: int, dataset, s: Sizes):
    """One method at one M as a peers.Runner whose epochs stop after ``s.epoch_seconds``."""
    import torch
    from gpu_peers import TorchvisionOnDevice
    from peers import Runner, decode_only_epochs, torch_loader

    from dali_ba.loader import BatchAugmentLoader

    options = dict(batch_size=s.batch, view_size=s.view_size, decoder="auto", num_threads=s.workers, seed=0)
    if method == "c":
        runner = torch_loader("c", dataset, views, SimpleNamespace(threads=s.workers, batch=s.batch, size=s.view_size, seed=0))
    elif method == "g":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        runner = Runner(TorchvisionOnDevice(dataset, s.batch, views, s.view_size, device).epoch)
    elif method == "a":
        runner = Runner(BatchAugmentLoader(dataset, views=views, **options).epoch)
    else:
        runner = Runner(decode_only_epochs(BatchAugmentLoader(dataset, views=1, **options)))
    return Runner(time_limited(runner.epoch, s.epoch_seconds), runner.pids)


def time_limited(epoch: Callable[[int], Iterable], seconds: float) -> Callable[[int], Iterator]:
    """Epochs that stop after ``seconds``, epoch 0 (the warm-up) after half of it, and wait for the GPU's
    work before they end."""
    import torch

    def limited(index: int) -> Iterator:
        start, limit = time.perf_counter(), seconds / 2 if index == 0 else seconds
        for batch in epoch(index):
            yield batch
            if time.perf_counter() - start > limit:
                break
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # DALI's own outputs (f) are not touched by the consumer

    return limited


def summary(method: str, views: int, epochs: list[dict], batch: int) -> dict:
    """benchmarks/peers.py's summary of one case, named here, with the rates without epoch starts and
    the CPU cores used (this process with its threads, plus DataLoader workers, over wall time)."""
    from peers import summarise

    row = summarise("f" if method == "f" else "a", views, epochs, batch)  # the letter only picks M = 1 for f
    row.update(method=method, name=METHODS[method],
               running_samples_per_s=row["running_views_per_s"] / row["views"],
               cores_used=sum(e["cpu_seconds"] for e in epochs) / sum(e["seconds"] for e in epochs))
    return row


# --- 5. Figure 5 and profile views ------------------------------------------------------------------------


def figure5_recipe(ctx: Ctx) -> Path:
    """The recipe of Figure 5's runs: ResNet-50 (smoke: ResNet-20), bf16, channels_last, B per GPU, on
    the ImageNet-like JPEGs; M comes from the command line."""
    s, train = ctx.sizes, ensure_images(ctx)
    path = ctx.dir / "figure5.toml"
    path.write_text(f'[data]\ntrain = "{train}"\nval = "{train}"\nbatch_size = {s.batch}\nview_size = {s.view_size}\n'
                    f'dali_threads = {max(1, s.workers // 2)}\ndecoder = "auto"\n\n'
                    f'[model]\narch = "{s.arch}"\namp = "bf16"\nchannels_last = true\n\n[run]\nseed = 0\n')
    return path


def profile_env() -> dict:
    # M = 10 puts 640 ResNet-50 views through one step: less fragmentation where memory is tight.
    return {**child_env(), "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def step_figure5(ctx: Ctx) -> int:
    """python -m dali_ba.profile step at each M: steps/s, the phases of a step, and the data stall
    against the same steps fed from batches in memory."""
    recipe, s = figure5_recipe(ctx), ctx.sizes
    ctx.result.update(recipe=recipe.read_text(), runs={}, results=[])
    for position, m in enumerate(s.views):
        out = ctx.dir / f"m{m}"
        command = [sys.executable, "-m", "dali_ba.profile", "step", "--recipe", str(recipe), "--views", str(m),
                   "--steps", str(s.steps), "--warmup", str(s.warmup), "--cache-batches", str(s.cache), "--out", str(out)]
        later = len(s.views) - position - 1  # keep 20 s for each M still to come
        rc, seconds = run_logged(command, ctx.dir / f"m{m}.log", ctx.left(3 + 20 * later), profile_env())
        ctx.result["runs"][m] = dict(rc=rc, seconds=round(seconds, 1))
        profile = read_json(out / "profile_step.json")
        if profile:
            ctx.result["results"].append(figure5_row(profile))
        ctx.save()
    return 0 if all(run["rc"] == 0 for run in ctx.result["runs"].values()) else 1


def figure5_row(p: dict) -> dict:
    fed, memory = p["loader"], p["memory"]
    return dict(views=p["views"], arch=p["arch"], amp=p["amp"], device=p["device"], decoder=p["decoder"],
                steps_per_s=p["steps_per_s"], images_per_s=p["images_per_s"], views_per_s=p["views_per_s"],
                memory_steps_per_s=memory["steps_per_s"], memory_images_per_s=memory["images_per_s"],
                data_stall=p["data_stall"], data_stall_raw=p["data_stall_raw"], data_wait_share=p["data_wait_share"],
                loader_alone_samples_per_s=p["pipeline"]["samples_per_s"],
                phases_ms={k: 1e3 * v for k, v in fed.get("phases", {}).items()},
                memory_phases_ms={k: 1e3 * v for k, v in memory.get("phases", {}).items()})


def step_views(ctx: Ctx) -> int:
    """python -m dali_ba.profile views over the same M (shorter): the sweep in one process, and the free views."""
    recipe, s = figure5_recipe(ctx), ctx.sizes
    out = ctx.dir / "views"
    command = [sys.executable, "-m", "dali_ba.profile", "views", "--recipe", str(recipe),
               "--views", ",".join(map(str, s.views)), "--steps", str(s.views_steps), "--warmup", str(min(s.warmup, 5)),
               "--cache-batches", str(s.cache), "--tolerance", "0.1", "--out", str(out)]
    rc, seconds = run_logged(command, ctx.dir / "views.log", ctx.left(), profile_env())
    profile = read_json(out / "profile_views.json") or {}
    rows = [dict(views=r["views"], steps_per_s=r["steps_per_s"], images_per_s=r["samples_per_s"],
                 views_per_s=r["views_per_s"], memory_images_per_s=profile["per_rank_batch"] / r["memory_step_time"],
                 data_stall=r["data_stall"], step_time_ratio=r["step_time_ratio"],
                 phases_ms={k: 1e3 * v for k, v in r.get("phases", {}).items()}) for r in profile.get("results", [])]
    ctx.result.update(rc=rc, seconds=round(seconds, 1), free_views=profile.get("free_views"),
                      tolerance=profile.get("tolerance"), results=rows)
    ctx.save()
    return 0 if rc == 0 else 1


STEPS: dict[str, Callable[[Ctx], int]] = {"env": step_env, "tests": step_tests, "demo": step_demo,
                                          "loader": step_loader, "figure5": step_figure5, "views": step_views}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_steps.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=list(STEPS))
    parser.add_argument("--dir", type=Path, required=True, help="this step's folder (log, result.json, raw outputs)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder shared by the steps")
    parser.add_argument("--limit", type=float, default=600, help="seconds this step may take")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.limit - 2  # the driver's clock started first
    ctx = Ctx(args.smoke, args.dir.resolve(), args.work.resolve(), deadline)
    ctx.result.update(step=args.step, smoke=args.smoke)
    ctx.save()
    return STEPS[args.step](ctx)


if __name__ == "__main__":
    sys.exit(main())
