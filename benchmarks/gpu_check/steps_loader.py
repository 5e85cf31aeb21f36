"""The GPU check's loader steps: ``loader`` (two facts of dali-ba's GPU path, benchmarks/gpu_check/facts.py;
dali-ba against torchvision on the CPU and on the GPU and against DALI's decode alone; the mixed decoder
at several ``hw_decoder_load``) and ``augment`` (the auto-augment graphs: their build time and views/s)."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks.gpu_check.context import Ctx, Sizes, ensure_images, gpu, read_json
from benchmarks.gpu_check.facts import FACTS
from benchmarks.gpu_check.processes import child_env, run_logged

# --- 5. the loader alone --------------------------------------------------------------------------------

METHODS = {
    "a": "dali-ba (decoder auto: mixed on a GPU)",
    "c": "torchvision DataLoader: decode_jpeg + v2, uint8",
    "g": "torchvision on the device: decode_jpeg(device) + v2",
    "f": "DALI decode alone (ceiling)",
}


ORDER_RULE = (
    "one case at a time: the cases of one M together, dali-ba (a) and its peers taking turns to go first "
    "(peers first at the 1st and 3rd M, a first at the 2nd; DALI's decode alone, f, after a at M = 1); "
    "each case builds its method, runs its own warm-up epoch right before its timed epochs (so it is "
    "timed on a machine it warmed itself, whatever ran before), and is closed before the next starts "
    "(a DataLoader's persistent workers shut down and joined, a pipeline deleted); after every epoch cut "
    "at its limit, a DataLoader's batches still in flight are received outside the timing, so no case's "
    "leftover work runs under another's clock"
)


def case_order(views: tuple[int, ...]) -> list[tuple[str, int]]:
    """The (method, M) cases in the order :data:`ORDER_RULE` states."""
    order: list[tuple[str, int]] = []
    for position, m in enumerate(views):
        methods = ["c", "g", "a"] if position % 2 == 0 else ["a", "g", "c"]
        order += [(method, m) for method in methods] + ([("f", m)] if position == 0 else [])
    return order


def step_loader(ctx: Ctx) -> int:
    """dali-ba against a tuned torchvision DataLoader, torchvision's own GPU decode + v2 on the GPU, and
    DALI's decode alone (the ceiling), on the ImageNet-like JPEGs, M = 1, 4, 10, one case at a time in
    the order of :data:`ORDER_RULE` (benchmarks/peers.py's epochs: a warm-up epoch, then timed ones, each
    stopped after ``epoch_seconds``). Each case is guarded and saved as it ends: one that fails (a peer's
    nvJPEG, say) is one error row, the others are still measured. Rates are per case's fastest epoch;
    ``running`` rates leave out each epoch's start (a DALI pipeline built or reset, a prefetch queue
    refilled), which an ImageNet epoch of 20,000 batches amortises. The facts of
    benchmarks/gpu_check/facts.py come first (:func:`measure_facts`: seconds, under a limit of their own),
    so that no case run long leaves them no time."""
    import torch

    from dali_ba.data.dataset import load_dataset

    data = ensure_images(ctx)
    dataset = load_dataset(data)
    s = ctx.sizes
    torch.set_num_threads(s.workers)
    cases = case_order(s.views)
    ctx.result.update(
        files=len(dataset),
        batch=s.batch,
        view_size=s.view_size,
        workers=s.workers,
        epoch_seconds=s.epoch_seconds,
        methods=METHODS,
        order_rule=ORDER_RULE,
        order=[f"{method} M={m}" for method, m in cases],
        results=[],
        errors=0,
    )
    ctx.save()
    measure_facts(ctx, data)
    sizes, ctx.result["headers"] = read_headers(dataset)
    ctx.save()
    for position, (method, views) in enumerate(cases):
        needed = 2 + s.epoch_seconds * (0.5 + s.loader_epochs)  # a build, the warm-up and the timed epochs
        if ctx.left() < needed:
            ctx.result["cut"] = f"no time left for {method} M = {views} and after"
            break
        # Measured, not assumed: the processes this one still has (a DataLoader's workers) as the case starts.
        before = len(leftover_processes())
        row = run_case(method, views, dataset, s, sizes)
        row.update(position=position, processes_before=before)
        ctx.result["errors"] += "error" in row
        ctx.result["results"].append(row)
        ctx.result["cuda"] = gpu()
        ctx.save()
    try:
        ctx.result["hw_decoder_load"] = hw_load_sweep(ctx, dataset)
    except Exception as exc:  # measured beside the cases: its failure loses none of them
        ctx.result["hw_decoder_load"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        ctx.result["errors"] += 1
    ctx.save()
    return 0 if not ctx.result["errors"] and "cut" not in ctx.result else 1


FACTS_LIMIT_S = 30.0  # the facts' process: ~10 s on a GPU (torch and DALI imported, three loaders built)


def measure_facts(ctx: Ctx, data: Path) -> None:
    """The facts of benchmarks/gpu_check/facts.py (``ctx.result[name]`` each), measured in a process of
    their own under :data:`FACTS_LIMIT_S`: one that fails, or a process that hangs, is an error (counted
    in ``errors``: its own row) and costs at most that, no other result; and CUDA starts there, not in
    this process, whose DataLoader workers fork. On the CPU each says why it was not measured."""
    out = ctx.dir / "facts.json"
    command = [sys.executable, "-m", "benchmarks.gpu_check.facts", "--data", str(data), "--out", str(out)]
    limit = min(FACTS_LIMIT_S, ctx.left())
    rc, seconds = run_logged(command + ["--smoke"] * ctx.smoke, ctx.dir / "facts.log", limit, child_env())
    found = read_json(out) or {}
    ended = f"was killed at its limit ({limit:.0f} s)" if rc is None else f"ended (rc {rc})"
    for name in FACTS:
        ctx.result[name] = found.get(name) or {"error": f"the facts' process {ended} before this fact"}
        ctx.result["errors"] += "error" in ctx.result[name]
    ctx.result["facts_process"] = dict(rc=rc, seconds=round(seconds, 1), limit_s=round(limit, 1))
    ctx.save()


def leftover_processes() -> list:
    """This process's children that a case could have left running (a DataLoader's workers), less
    multiprocessing's resource tracker, which lives as long as this process once ``ensure_images``
    has spawned its JPEG makers here."""
    import psutil

    def tracker(child) -> bool:
        try:
            return "multiprocessing.resource_tracker" in " ".join(child.cmdline())
        except psutil.Error:  # ended meanwhile
            return False

    return [child for child in psutil.Process().children(recursive=True) if not tracker(child)]


def read_headers(dataset) -> tuple[np.ndarray | None, dict]:
    """Every sample's decoded size, read from its header on :data:`READ_THREADS` threads as dali-ba's
    reader does on a sample's first read in a run (then it keeps the size for the run): the cache the
    dali-ba cases share, so that they are timed as from a run's second epoch on, whatever case ran
    first; and that first pass's own rate. On the H200 the cases' timed epochs were mostly first reads
    (2,200 samples/s at any M), which this separates. None where a header fails: each case reads its own."""
    from concurrent.futures import ThreadPoolExecutor

    from dali_ba.loading.reader import READ_THREADS, header_size, new_size_cache

    sizes = new_size_cache(dataset)

    def read(index: int) -> None:
        sizes[index] = header_size(dataset.read(index))

    start, cpu = time.perf_counter(), time.process_time()
    try:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            list(pool.map(read, range(len(dataset))))
    except Exception as exc:
        return None, {"error": f"{type(exc).__name__}: {exc}"[:500]}
    wall = time.perf_counter() - start
    rate = dict(samples=len(dataset), threads=READ_THREADS, seconds=round(wall, 2), samples_per_s=len(dataset) / wall)
    print(f"headers: {rate['samples_per_s']:.0f} samples/s (read and parsed, {READ_THREADS} threads)", flush=True)
    return sizes, dict(rate, cores_busy=(time.process_time() - cpu) / wall)


def run_case(method: str, views: int, dataset, s: Sizes, sizes: np.ndarray | None = None) -> dict:
    """One case of :data:`ORDER_RULE`: built, warmed up, timed, closed (always, even when it failed); its
    summary row, or an error row (method, M, the error) when any of that raised."""
    import torch

    from benchmarks.peers import run_epoch

    runner = None
    try:
        print(f"{method} M={views}: warm-up", flush=True)
        runner = make_method(method, views, dataset, s, sizes)
        run_epoch(runner, 0)  # settles itself: nothing in flight when the timed epochs start
        epochs = []
        for index in range(s.loader_epochs):
            epochs.append(run_epoch(runner, 1 + index))
            e = epochs[-1]
            print(
                f"{method} M={views} epoch {index + 1}: {e['batches'] * s.batch / e['seconds']:.0f} samples/s, "
                f"{e['cpu_seconds'] / e['seconds']:.1f} cores",
                flush=True,
            )
        return summary(method, views, epochs, s.batch)
    except Exception as exc:  # one case that fails leaves the others to measure
        print(f"{method} M={views}: {type(exc).__name__}: {exc}", flush=True)
        return dict(method=method, name=METHODS[method], views=views, error=f"{type(exc).__name__}: {exc}"[:500])
    finally:
        if runner is not None:
            try:
                runner.close()  # a DataLoader's workers ended and joined before the next case starts
            except Exception as exc:  # said in the log; the next case's processes_before shows what was left
                print(f"{method} M={views}: closing: {type(exc).__name__}: {exc}", flush=True)
        del runner
        gc.collect()  # a DALI pipeline (a, f) goes with its loader
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def hw_load_sweep(ctx: Ctx, dataset) -> dict:
    """The mixed decoder at dali-ba's default ``hw_decoder_load`` and at ``hw_loads`` (the share of each
    batch for the hardware JPEG decoder, the rest on CUDA): DALI's decode alone in images/s and CPU ms
    per image, and, where the loader takes the keyword, dali-ba's views/s at M = ``hw_load_views``
    (a warm-up epoch, then one timed, each cut at ``epoch_seconds``). Needs a GPU: the cpu decoder has
    no such split, so the smoke run records why it measured nothing."""
    import inspect

    from benchmarks.gpu_check.steps_env import dali_decode_rate, default_hw_decoder_load
    from benchmarks.peers import Runner, run_epoch
    from dali_ba.loading.loader import BatchAugmentLoader

    s = ctx.sizes
    default = default_hw_decoder_load()
    loads = (default, *[load for load in s.hw_loads if load != default])
    keyword = "hw_decoder_load" in inspect.signature(BatchAugmentLoader).parameters
    out: dict = dict(default=default, loads=list(loads), loader_keyword=keyword, views=s.hw_load_views, rows=[])
    if not gpu():
        out["skipped"] = (
            "needs a GPU: hw_decoder_load splits the mixed decoder's work between the hardware JPEG "
            "decoder and CUDA; the cpu decoder has neither, so nothing was measured"
        )
        return out
    if not keyword:
        out["loader_note"] = "BatchAugmentLoader has no hw_decoder_load keyword in this checkout: decode rates only"
    for load in loads:
        if ctx.left() < 8:
            out["cut"] = f"no time left for hw_decoder_load {load} and after"
            break
        row = dict(
            hw_decoder_load=load,
            default=load == default,
            decode=dali_decode_rate(list(dataset.files[: 8 * s.batch]), "mixed", load, s.workers, s.epoch_seconds),
        )
        if keyword:
            try:
                loader = BatchAugmentLoader(
                    dataset,
                    batch_size=s.batch,
                    views=s.hw_load_views,
                    view_size=s.view_size,
                    decoder="mixed",
                    num_threads=s.workers,
                    seed=0,
                    hw_decoder_load=load,
                )
                runner = Runner(time_limited(loader.epoch, s.epoch_seconds))
                run_epoch(runner, 0)
                loaded = summary("a", s.hw_load_views, [run_epoch(runner, 1)], s.batch)
                row["loader"] = {
                    key: loaded[key]
                    for key in (
                        "samples_per_s",
                        "views_per_s",
                        "running_views_per_s",
                        "running_samples_per_s",
                        "cores_used",
                        "first_batch_s",
                    )
                }
            except Exception as exc:  # a value the installed DALI refuses is a finding, not the end of the step
                row["loader"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"hw_decoder_load {load}: {row}", flush=True)
        out["rows"].append(row)
        ctx.save()
    return out


def make_method(method: str, views: int, dataset, s: Sizes, sizes: np.ndarray | None = None):
    """One method at one M as a peers.Runner whose epochs stop after ``s.epoch_seconds``; dali-ba's
    loaders (a, f) with ``sizes``, the headers' sizes read before (:func:`read_headers`), where given."""
    import torch

    from benchmarks.gpu_check.torchvision_on_device import TorchvisionOnDevice
    from benchmarks.peers import Runner, decode_only_epochs, torch_loader
    from dali_ba.loading.loader import BatchAugmentLoader

    options = dict(batch_size=s.batch, view_size=s.view_size, decoder="auto", num_threads=s.workers, seed=0)
    if method == "c":
        runner = torch_loader(
            "c", dataset, views, SimpleNamespace(threads=s.workers, batch=s.batch, size=s.view_size, seed=0)
        )
    elif method == "g":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        runner = Runner(TorchvisionOnDevice(dataset, s.batch, views, s.view_size, device).epoch)
    elif method == "a":
        runner = Runner(with_sizes(BatchAugmentLoader(dataset, views=views, **options), sizes).epoch)
    else:
        runner = Runner(decode_only_epochs(with_sizes(BatchAugmentLoader(dataset, views=1, **options), sizes)))
    return Runner(time_limited(runner.epoch, s.epoch_seconds), runner.pids, runner.settle, runner.close)


def with_sizes(loader, sizes: np.ndarray | None):
    """``loader`` reading with a run's cache of decoded sizes already filled (shareable, as documented)."""
    if sizes is not None:
        loader.sizes = sizes
    return loader


def time_limited(epoch: Callable[[int], Iterable], seconds: float) -> Callable[[int], Iterator]:
    """Epochs that stop after ``seconds``, epoch 0 (the warm-up) after half of it, and wait for the GPU's
    work before they end. A timed epoch yields 2 batches at least: its running rate leaves the first out
    (a slow peer on a busy CPU, the smoke run's, may take all of ``seconds`` for one)."""
    import torch

    def limited(index: int) -> Iterator:
        start, limit = time.perf_counter(), seconds / 2 if index == 0 else seconds
        at_least = 1 if index == 0 else 2
        for count, batch in enumerate(epoch(index), 1):
            yield batch
            if time.perf_counter() - start > limit and count >= at_least:
                break
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # DALI's own outputs (f) are not touched by the consumer

    return limited


def summary(method: str, views: int, epochs: list[dict], batch: int) -> dict:
    """benchmarks/peers.py's summary of one case, named here, with the rates without epoch starts and
    the CPU cores used (this process with its threads, plus DataLoader workers, over wall time)."""
    from benchmarks.peers import summarise

    row = summarise("f" if method == "f" else "a", views, epochs, batch)  # the letter only picks M = 1 for f
    row.update(
        method=method,
        name=METHODS[method],
        running_samples_per_s=row["running_views_per_s"] / row["views"],
        cores_used=sum(e["cpu_seconds"] for e in epochs) / sum(e["seconds"] for e in epochs),
    )
    return row


# --- 6. the auto-augment graphs -------------------------------------------------------------------------

AUTO_AUGMENTS = ("randaugment", "trivial")  # at each M, randaugment first: its M = 10 / M = 4 is a target


def step_augment(ctx: Ctx) -> int:
    """The auto-augment training views through the loader API (``BatchAugmentLoader(..., augment=...,
    stage="dali")`` with the recipe's augmentation defaults, decoder auto: mixed and DALI's GPU
    operators on a GPU, the cpu decoder and DALI's CPU operators in the smoke run) at each M of
    ``augment_views``: ``graph_s``, the first epoch's first batch (the graph defined, of a few hundred
    operators, built, and run once), ``epoch_start_s``, the next epoch's first batch (the same graph, a
    new plan), and views/s over ``augment_seconds`` of batches after them. What a batch at M = 10
    costs against M = 4 is a target (:func:`benchmarks.gpu_check.report.targets`)."""
    from dali_ba.data.dataset import load_dataset
    from dali_ba.loading.loader import BatchAugmentLoader
    from dali_ba.recipe import DataConfig

    dataset, s = load_dataset(ensure_images(ctx)), ctx.sizes
    cases = [(augment, views) for views in s.augment_views for augment in AUTO_AUGMENTS]
    ctx.result.update(
        files=len(dataset),
        batch=s.batch,
        view_size=s.view_size,
        threads=s.workers,
        cuda=gpu(),
        seconds_per_case=s.augment_seconds,
        results=[],
        errors={},
    )
    for augment, views in cases:
        if ctx.left() < 5:
            ctx.result["cut"] = f"no time left for {augment} M = {views} and after"
            break
        options = dict(DataConfig().augmentation(), augment=augment, stage="dali")
        try:
            loader = BatchAugmentLoader(
                dataset, s.batch, views, s.view_size, decoder="auto", num_threads=s.workers, seed=0, **options
            )
            row = time_auto_augment(loader, s.augment_seconds)
        except Exception as exc:  # one graph that fails leaves the others to measure
            ctx.result["errors"][f"{augment} M={views}"] = f"{type(exc).__name__}: {exc}"[:500]
            ctx.save()
            continue
        row.update(
            augment=augment,
            views=views,
            decoder=loader.decoder,
            stage=loader.stage,
            device=str(loader.device),
            randaugment_n=options["randaugment_n"],
            randaugment_m=options["randaugment_m"],
        )
        print(f"{augment} M={views}: graph {row['graph_s']:.1f} s, {row['views_per_s']:.0f} views/s", flush=True)
        ctx.result["results"].append(row)
        ctx.save()
    return 0 if len(ctx.result["results"]) == len(cases) else 1


def time_auto_augment(loader, seconds: float) -> dict:
    """The loader's first batch ever (graph defined and built), the next epoch's first batch (graph
    reused), then batches for ``seconds`` across epochs: views/s and samples/s (each batch touched)."""
    import torch

    def first(epoch: int) -> tuple[Iterator, float]:
        start = time.perf_counter()
        batches = loader.epoch(epoch)
        images, _ = next(batches)
        images[(0,) * images.dim()].cpu()  # one element read on the host: the batch is ready
        return batches, time.perf_counter() - start

    _, graph_s = first(0)
    batches, epoch_start_s = first(1)  # epoch 0 left after a batch: the loader drains what is in flight
    count, epoch, start = 0, 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            images, _ = next(batches)
        except StopIteration:
            epoch += 1
            batches = loader.epoch(epoch)
            continue
        images[(0,) * images.dim()].cpu()  # one element read on the host: the batch is ready
        count += 1
    wall = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    samples = count * loader.batch_size
    return dict(
        graph_s=graph_s,
        epoch_start_s=epoch_start_s,
        batches=count,
        seconds=wall,
        samples_per_s=samples / wall,
        views_per_s=samples * loader.views / wall,
    )
