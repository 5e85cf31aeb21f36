"""What the steps of the GPU check share (benchmarks/gpu_check/steps.py runs them): the sizes of the GPU
run and of the CPU smoke run, a step's context (folder, scratch folder, deadline, result), and the
ImageNet-like JPEGs the steps read."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


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
    augment_views: tuple[int, ...]  # M of the auto-augment step, in its order (4 and 10 first: their ratio is a target)
    augment_seconds: float  # auto-augment step: timed batches per (augmentation, M) for this long, after one
    hw_loads: tuple[float, ...]  # loader step: hw_decoder_load values measured beside the default (GPU only)
    hw_load_views: int  # loader step: M of the loader's runs at those values
    test_parallel: int  # tests step: test files run at once, each in its own pytest process
    compile_views: int  # compile step: M of Figure 5's run with --compile
    compile_steps: int  # compile step: its timed steps and warm-up (fewer than figure5's: the compile is the
    compile_warmup: int  # long part, and the step has a fixed share of the budget)


FULL = Sizes(
    images=2048,
    copies=4,
    batch=64,
    view_size=224,
    views=(1, 4, 10),
    workers=16,
    loader_epochs=2,
    epoch_seconds=2.0,
    demo_per_class=(64, 20),
    demo_args=(),
    resume_args=("--epochs", "2", "--batch-size", "16", "--log-every", "1"),
    arch="resnet50",
    steps=30,
    warmup=8,
    cache=8,
    views_steps=15,
    augment_views=(4, 10, 1),
    augment_seconds=2.0,
    hw_loads=(0.35, 0.9),
    hw_load_views=4,
    test_parallel=4,
    compile_views=4,
    compile_steps=10,
    compile_warmup=3,
)
SMOKE = Sizes(
    images=24,
    copies=2,
    batch=8,
    view_size=32,
    views=(1, 4, 10),
    workers=2,
    loader_epochs=1,
    epoch_seconds=1.0,
    demo_per_class=(8, 2),
    demo_args=("--epochs", "1", "--batch-size", "16", "--views", "2", "--timing-warmup", "1"),
    resume_args=("--epochs", "1", "--batch-size", "8", "--views", "2", "--log-every", "1"),
    arch="resnet20",
    steps=3,
    warmup=1,
    cache=2,
    views_steps=2,
    augment_views=(4, 10, 1),
    augment_seconds=1.0,
    hw_loads=(0.35, 0.9),
    hw_load_views=4,
    test_parallel=2,
    compile_views=4,
    compile_steps=3,
    compile_warmup=1,
)


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
    """The ImageNet-like training folder, made once for every step that needs it (in parallel), and kept
    for a later part in the same ``--work`` folder (the same seeded JPEGs) where its sizes match."""
    root = ctx.work / "imagenet_like"
    made = f"{ctx.sizes.images} images x {ctx.sizes.copies}"
    if (root / ".complete").is_file() and (root / ".complete").read_text() == made:
        return root / "train"
    shutil.rmtree(root, ignore_errors=True)
    workers = min(16, len(os.sched_getaffinity(0)))
    counts = [ctx.sizes.images // workers + (k < ctx.sizes.images % workers) for k in range(workers)]
    # Spawned, not forked: a caller with threads (DALI's, a reader's pool, torch's) forks children that
    # can hang on a lock held at the fork (the strict test pass did, in a test that makes them in-process).
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_make_part, [(root / "parts" / str(k), count, k) for k, count in enumerate(counts) if count]))
    for path in sorted((root / "parts").rglob("*.jpg")):
        folder = root / "train" / path.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        for copy in range(ctx.sizes.copies):
            os.link(path, folder / f"{path.parent.parent.name}_{copy}_{path.name}")
    (root / ".complete").write_text(made)
    return root / "train"


def _make_part(job: tuple[Path, int, int]) -> None:
    from benchmarks.make_images import IMAGENET_LIKE, write_images

    folder, count, seed = job
    write_images(folder, count, seed, **IMAGENET_LIKE)


def module_version(name: str) -> str | None:
    """The module's version, or None where it does not import (and so is not there)."""
    import importlib

    try:
        return str(getattr(importlib.import_module(name), "__version__", "?"))
    except Exception:
        return None


def recipe_flag(flag: str) -> bool:
    """Whether this checkout's recipe knows ``flag`` (e.g. ``--deterministic``, ``--compile``): flags
    that are being added are used where they exist, and their absence is reported, not guessed around."""
    from dali_ba.recipe import build_parser

    return flag in build_parser("probe", "")._option_string_actions
