"""Peers side by side: seven ways to feed B samples x M views, on the same files, cores and view size.

    python -m benchmarks.peers [--data data/bench] [--views 1,4,10] [--batch 32] [--epochs 4]
                               [--threads 2] [--size 224] [--out benchmarks/results]

(a) dali-ba            BatchAugmentLoader, cpu decoder: DALI decodes once, torch makes the M random-resized-crop
                       + flip views in threads, into one uint8 batch
(b) paper (PIL, float) PIL decode once, torchvision transform M times, ToTensor + Normalize (float32),
                       torch DataLoader, one worker per core (the paper authors' published approach)
(c) tuned torchvision  torchvision.io.decode_jpeg once, transforms.v2 M times on uint8, no normalisation
(d) re-read per view   a sampler repeats every index M times ("repeated augmentation", timm/DeiT):
                       each copy is read, decoded and augmented on its own (decode_jpeg + v2, uint8)
(e) DALI decode/view   DALI decodes again for every view (fused decode + random crop, then resize, flip)
(f) DALI decode only   the ceiling: DALI reader + decoder, nothing else, no copy to torch
(w) dali-ba, whole     (a) decoding each whole image instead of the union of its views' boxes
                       (``roi_decode=False``): what the ROI decode saves

Equal footing: every method gets ``--threads`` threads of each kind (DataLoader workers for b-d, DALI
threads for e and f; for a, as many DALI decoding threads and view threads, which take turns on the
same cores), the same files, batch size, view size and random-resized-crop + flip semantics (area
(0.08, 1), aspect (3/4, 4/3), bilinear with antialiasing); a, c, d, e deliver uint8, b float32.
Timing: one warm-up epoch per (method, M) is excluded (it starts workers, loads libraries); then
``--epochs`` timed epochs, interleaved round-robin over methods and M so that a change in machine
load hits all of them alike. A timed epoch is everything a training loop would wait for, including
each method's per-epoch start: dali-ba and e keep one DALI pipeline per run and reset it, f builds
one per epoch, the DataLoaders (persistent workers) refill their prefetch queues; the time to the
first batch is recorded apart.
samples/s and views/s are those of each method's fastest timed epoch (on a machine shared with
other work, the least disturbed one; "mean" is over all timed epochs). CPU ms/view is the CPU time
the method used (this process with its DALI threads, plus its DataLoader workers) per view, median
over epochs: it varies much less with other load than wall time does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m benchmarks.peers"

from dali_ba.data.dataset import ImageDataset, load_dataset  # noqa: E402
from dali_ba.loading.loader import BatchAugmentLoader  # noqa: E402
from dali_ba.loading.pipeline import read_samples  # noqa: E402
from dali_ba.loading.tensors import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from dali_ba.machine import describe_machine  # noqa: E402

AREA, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
METHODS = {
    "a": "dali-ba",
    "b": "paper: PIL + torchvision, float",
    "c": "tuned: decode_jpeg + v2, uint8",
    "d": "re-read per view (repeated aug.)",
    "e": "DALI decode per view",
    "f": "DALI decode only (ceiling)",
    "w": "dali-ba, whole images decoded",
}
TARGET_F = 0.7  # a/f samples/s at M = 1
TARGET_W = 1.0  # a/w samples/s at M = 1: decoding only the view's box saves time (at M > 1: measured only)


def target_ratio(peer: str, views: int) -> float:
    """The issue's targets for a/c and a/b views/s: >= 1 x (c) at every M; >= 3 x (b), 2 x at M = 1."""
    return 1.0 if peer == "c" else 2.0 if views == 1 else 3.0


# --- torch DataLoader peers (b, c, d) ------------------------------------------------------------
class PaperViews(torch.utils.data.Dataset):
    """(b): PIL decode once, then the torchvision (v1) ImageNet transform M times, float normalised."""

    def __init__(self, dataset: ImageDataset, views: int, size: int) -> None:
        import torchvision.transforms as T

        self.files, self.labels, self.views = dataset.files, dataset.labels, views
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(size, scale=AREA, ratio=RATIO),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        with open(self.files[index], "rb") as f:
            image = Image.open(f).convert("RGB")  # torchvision's ImageFolder loader
        return torch.stack([self.transform(image) for _ in range(self.views)]), self.labels[index]


class TunedViews(torch.utils.data.Dataset):
    """(c), and (d) with ``views=1``: libjpeg-turbo decode to a uint8 tensor, transforms.v2 on uint8."""

    def __init__(self, dataset: ImageDataset, views: int, size: int) -> None:
        from torchvision.transforms import v2

        self.files, self.labels, self.views = dataset.files, dataset.labels, views
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=AREA, ratio=RATIO, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        image = decode_jpeg(read_file(self.files[index]), mode=ImageReadMode.RGB)
        views = [self.transform(image) for _ in range(self.views)]
        return (torch.stack(views) if self.views > 1 else views[0]), self.labels[index]


class RepeatSampler(torch.utils.data.Sampler):
    """timm's RepeatAugSampler on one rank: a fresh permutation per epoch, each index ``repeats`` times in a row."""

    def __init__(self, size: int, repeats: int, seed: int) -> None:
        self.size, self.repeats, self.seed, self.epoch = size, repeats, seed, 0

    def __len__(self) -> int:
        return self.size * self.repeats

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        self.epoch += 1
        return iter(order.repeat_interleave(self.repeats).tolist())


@dataclass
class Runner:
    """One method at one M: ``epoch(i)`` iterates epoch i; ``pids()`` are its worker processes (CPU accounting)."""

    epoch: Callable[[int], Iterable]
    pids: Callable[[], list[int]] = list
    settle: Callable[[], None] = lambda: None  # after an epoch, outside its timing: the work it left in flight done
    close: Callable[[], None] = lambda: None  # its worker processes ended and joined


def settle_workers(loader: torch.utils.data.DataLoader) -> None:
    """Wait until a persistent-worker DataLoader's workers are idle: an epoch cut short (a time limit) leaves up
    to prefetch_factor x workers batches in flight, which the workers would go on making under the next
    timed case's clock (or, at this loader's next epoch start, under its own). Receives them, asks for no
    more; the next epoch starts from a clean iterator as usual. Through torch's private iterator state (no
    public API waits for in-flight batches): where that is not there, the workers are ended instead."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None or getattr(iterator, "_shutdown", True):
        return
    if not (hasattr(iterator, "_tasks_outstanding") and hasattr(iterator, "_get_data")):
        end_workers(loader)
        return
    while iterator._tasks_outstanding > 0:
        iterator._get_data()
        iterator._tasks_outstanding -= 1


def end_workers(loader: torch.utils.data.DataLoader) -> None:
    """Shut a persistent-worker DataLoader's workers down and wait until they have exited (none left running
    under a later case's clock); its next epoch would start new ones."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    workers = [w.pid for w in getattr(iterator, "_workers", [])]
    iterator._shutdown_workers()
    loader._iterator = None
    alive = []
    for pid in workers:
        try:
            alive.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def torch_loader(method: str, dataset: ImageDataset, views: int, args) -> Runner:
    """A persistent-worker DataLoader for (b), (c) or (d)."""
    common = dict(num_workers=args.threads, persistent_workers=True, drop_last=True, prefetch_factor=2)
    if method == "d":
        loader = torch.utils.data.DataLoader(
            TunedViews(dataset, 1, args.size),
            batch_size=args.batch * views,
            sampler=RepeatSampler(len(dataset), views, args.seed),
            **common,
        )
    else:
        data = (PaperViews if method == "b" else TunedViews)(dataset, views, args.size)
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=args.batch,
            shuffle=True,
            generator=torch.Generator().manual_seed(args.seed),
            **common,
        )
    # The workers live in the persistent iterator (torch keeps it on the loader, a private attribute).
    return Runner(
        lambda epoch: loader,
        lambda: [w.pid for w in getattr(loader._iterator, "_workers", [])],
        lambda: settle_workers(loader),
        lambda: end_workers(loader),
    )


# --- DALI peers (a, e, f) ------------------------------------------------------------------------
def decode_per_view_pipeline(samples, views: int, view_size: int, decoder: str, **kwargs):
    """(e): the encoded file is read once, but every view decodes it again (only its random crop)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(**kwargs)
    def pipe():
        jpegs, label = read_samples(samples)
        out = []
        for _ in range(views):
            view = fn.decoders.image_random_crop(
                jpegs, device=decoder, output_type=types.RGB, random_area=AREA, random_aspect_ratio=RATIO
            )
            view = fn.resize(view, size=(view_size, view_size))
            out.append(fn.flip(view, horizontal=fn.random.coin_flip()))
        return fn.stack(*out), label

    return pipe()


def decode_only_pipeline(samples, decoder: str, **kwargs):
    """(f): read and decode, nothing else."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(**kwargs)
    def pipe():
        jpegs, label = read_samples(samples)
        return fn.decoders.image(jpegs, device=decoder, output_type=types.RGB), label

    return pipe()


class DecodePerViewLoader(BatchAugmentLoader):
    """(e) through dali-ba's own plumbing (sharding, one pipeline per run, copy into torch), so that only the
    graph differs."""

    _view_params = None  # its graph draws the views itself (DALI's random operators): no parameters to feed

    def _stage(self, stage: str | None = None) -> str:
        return "dali"  # DALI makes the views in this graph

    def _graph(self, source, stage: str | None):
        return decode_per_view_pipeline(
            source, views=self.views, view_size=self.view_size, decoder=self.decoder, **self._run_args(self.seed)
        )


def decode_only_epochs(loader: BatchAugmentLoader) -> Callable[[int], Iterable]:
    """(f): a decode-only pipeline per epoch, run for the loader's steps; outputs stay in DALI."""

    def epoch(index: int) -> Iterator:
        pipe = decode_only_pipeline(**loader._pipeline_args(loader.shard(index), seed=0))
        pipe.build()
        for _ in range(len(loader)):
            yield pipe.run()

    return epoch


def make_method(method: str, dataset: ImageDataset, views: int, args) -> Runner:
    """One method at one M (DALI threads run inside this process: no worker processes)."""
    if method in "bcd":
        return torch_loader(method, dataset, views, args)
    options = dict(
        batch_size=args.batch, views=views, view_size=args.size, decoder="cpu", num_threads=args.threads, seed=args.seed
    )
    if method in "aw":
        return Runner(BatchAugmentLoader(dataset, roi_decode=method == "a", **options).epoch)
    if method == "e":
        return Runner(DecodePerViewLoader(dataset, **options).epoch)
    return Runner(decode_only_epochs(BatchAugmentLoader(dataset, **options)))


# --- timing --------------------------------------------------------------------------------------
def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of this process (all its threads, DALI's included) and of ``pids``."""
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in [os.getpid(), *pids])


def run_epoch(runner: Runner, epoch: int) -> dict:
    """Time one full epoch: wall and CPU seconds, seconds to the first batch, batches (each one touched)."""
    cpu, start = cpu_seconds(runner.pids()), time.perf_counter()
    first, batches = None, 0
    for batch in runner.epoch(epoch):
        if isinstance(batch, (tuple, list)) and isinstance(batch[0], torch.Tensor):
            batch[0][(0,) * batch[0].dim()].cpu()  # one element, read on the host (meant: .cpu()): no copy of the batch
        first = first if first is not None else time.perf_counter() - start
        batches += 1
    seconds = time.perf_counter() - start
    used = cpu_seconds(runner.pids()) - cpu
    runner.settle()  # outside the timing: what a cut epoch left in flight done before anything else is timed
    return dict(seconds=seconds, cpu_seconds=used, first_batch_s=first or 0.0, batches=batches)


def summarise(method: str, views: int, epochs: list[dict], batch: int) -> dict:
    """Rates over all timed epochs and for the fastest one (the one least disturbed by other load)."""
    views = 1 if method == "f" else views
    samples = sum(e["batches"] for e in epochs) * batch
    seconds = sum(e["seconds"] for e in epochs)
    best = min(epochs, key=lambda e: e["seconds"] / e["batches"])
    # Without each epoch's start (pipeline build / prefetch refill, first batch): the rate once running.
    running = (samples - len(epochs) * batch) / (seconds - sum(e["first_batch_s"] for e in epochs))
    return dict(
        method=method,
        name=METHODS[method],
        views=views,
        samples=samples,
        seconds=round(seconds, 3),
        samples_per_s=best["batches"] * batch / best["seconds"],
        views_per_s=best["batches"] * batch * views / best["seconds"],
        mean_views_per_s=samples * views / seconds,
        running_views_per_s=running * views,
        cpu_ms_per_view=float(np.median([e["cpu_seconds"] / (e["batches"] * batch * views) for e in epochs])) * 1e3,
        first_batch_s=float(np.median([e["first_batch_s"] for e in epochs])),
        epochs=[{k: round(v, 4) for k, v in e.items()} for e in epochs],
    )


def benchmark(dataset: ImageDataset, args) -> list[dict]:
    """Warm up every (method, M), then time ``args.epochs`` epochs of each, round-robin."""
    cases = [(m, v) for v in args.views for m in args.methods if not (m == "f" and v != args.views[0])]
    runners, records = {}, {}
    for method, views in cases:
        print(f"warm-up {method} M={views}", flush=True)
        runners[method, views] = make_method(method, dataset, views, args)
        run_epoch(runners[method, views], 0)
        records[method, views] = []
    for rnd in range(args.epochs):
        for method, views in cases:
            record = run_epoch(runners[method, views], 1 + rnd)
            records[method, views].append(record)
            print(
                f"round {rnd + 1}/{args.epochs} {method} M={views}: "
                f"{record['batches'] * args.batch / record['seconds']:8.1f} samples/s, "
                f"{record['cpu_seconds'] / record['seconds']:4.2f} cores busy, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    return [summarise(method, views, records[method, views], args.batch) for method, views in cases]


def ratios(results: list[dict], views: list[int]) -> list[dict]:
    """The ratios the targets name (fastest epochs), each with its target and whether this run meets it.

    ``cpu_value`` is the same comparison made with CPU time per view (peer's / dali-ba's): what the
    ratio would be if both had the two cores to themselves and kept them busy.
    """
    rate = {(r["method"], r["views"]): r for r in results}
    out = []
    pairs = [(peer, target_ratio(peer, m), m) for m in views for peer in "cb"] + [("f", TARGET_F, 1)]
    pairs += [("w", TARGET_W if m == 1 else None, m) for m in views]
    for peer, target, m in pairs:
        if ("a", m) in rate and (peer, m) in rate:
            ours, theirs = rate["a", m], rate[peer, m]
            key = "samples_per_s" if peer in "fw" else "views_per_s"
            value = ours[key] / theirs[key]
            cpu = theirs["cpu_ms_per_view"] * theirs["views"] / m / ours["cpu_ms_per_view"]
            out.append(
                dict(
                    ratio=f"a/{peer} {key.replace('_per_s', '/s')}",
                    views=m,
                    value=value,
                    cpu_value=cpu,
                    target=target,
                    met=None if target is None else value >= target,
                )
            )
    return out


# --- report --------------------------------------------------------------------------------------
def machine() -> dict:
    """What the numbers were measured on."""
    import nvidia.dali
    import PIL
    import torchvision

    return dict(
        describe_machine(),
        gpu=torch.cuda.is_available(),
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        dali=nvidia.dali.__version__,
        pillow=PIL.__version__,
        numpy=np.__version__,
        load_average=os.getloadavg(),
    )


def data_summary(dataset: ImageDataset) -> dict:
    from PIL import Image

    sizes = [Image.open(path).size for path in dataset.files]
    nbytes = [os.path.getsize(path) for path in dataset.files]
    return dict(
        files=len(dataset),
        classes=dataset.num_classes,
        mean_width=float(np.mean([s[0] for s in sizes])),
        mean_height=float(np.mean([s[1] for s in sizes])),
        mean_kib=float(np.mean(nbytes)) / 1024,
    )


def decoded_share(dataset: ImageDataset, views: list[int], seed: int) -> dict[str, float]:
    """{M: the share of each image's pixels that dali-ba decodes (its region, the union of its M
    boxes), averaged over the files}, for epoch 0's draws at the files' own sizes: what (a) decodes
    of what (w) does."""
    from PIL import Image

    from dali_ba.loading.augment import Augmentation, view_regions

    sizes = np.array([Image.open(path).size[::-1] for path in dataset.files])
    indices = np.arange(len(dataset))
    out = {}
    for m in views:
        regions, _ = view_regions(Augmentation(seed=seed).draw(0, indices, sizes, m).boxes, sizes)
        out[str(m)] = float(np.mean(regions[:, 2] * regions[:, 3] / sizes.prod(axis=1)))
    return out


def table(results: list[dict], rows: list[dict]) -> str:
    lines = [
        f"{'method':40s} {'M':>3s} {'samples/s':>9s} {'views/s':>8s} {'mean':>8s} {'CPU ms/view':>11s} "
        f"{'1st batch s':>11s}"
    ]
    for r in results:
        lines.append(
            f"({r['method']}) {r['name']:36s} {r['views']:3d} {r['samples_per_s']:9.1f} {r['views_per_s']:8.1f} "
            f"{r['mean_views_per_s']:8.1f} {r['cpu_ms_per_view']:11.3f} {r['first_batch_s']:11.3f}"
        )
    lines.append("")
    lines.append(f"{'ratio':16s} {'M':>3s} {'value':>6s} {'by CPU':>7s} {'target':>7s}")
    for row in rows:
        lines.append(
            f"{row['ratio']:16s} {row['views']:3d} {row['value']:6.2f} {row['cpu_value']:7.2f} "
            f"{_target(row, '>= '):>7s} {_verdict(row, 'met', 'MISSED')}"
        )
    return "\n".join(lines)


def _target(row: dict, at_least: str) -> str:
    """A ratio's target as a table shows it; a row that is only measured has none."""
    return "—" if row["target"] is None else f"{at_least}{row['target']}"


def _verdict(row: dict, met: str, missed: str) -> str:
    return "" if row["met"] is None else met if row["met"] else missed


def markdown(results: list[dict], rows: list[dict]) -> str:
    """The README tables: throughput per method and M, then the ratios against their targets."""
    lines = [
        "| method | M | samples/s | views/s | views/s, mean of epochs | CPU ms per view | first batch s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| ({r['method']}) {r['name']} | {r['views']} | {r['samples_per_s']:.0f} | {r['views_per_s']:.0f} | "
            f"{r['mean_views_per_s']:.0f} | {r['cpu_ms_per_view']:.2f} | {r['first_batch_s']:.3f} |"
        )
    lines += ["", "| ratio | M | this run | by CPU time | target | |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        lines.append(
            f"| {row['ratio']} | {row['views']} | {row['value']:.2f} | {row['cpu_value']:.2f} | "
            f"{_target(row, '≥ ')} | {_verdict(row, 'met', '**missed**')} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    for index, (method, name) in enumerate(METHODS.items()):  # a method keeps its colour across plots
        points = sorted((r["views"], r["views_per_s"]) for r in results if r["method"] == method)
        if not points:
            continue
        if method == "f":
            ax.axhline(points[0][1], color="grey", linestyle="--", label=f"({method}) {name}: decoded images/s")
            continue
        ax.plot(*zip(*points), marker="o", color=f"C{index}", label=f"({method}) {name}")
    ax.set_xlabel("views per sample M")
    ax.set_ylabel("views per second (higher is better)")
    ax.set_xticks(sorted({r["views"] for r in results if r["method"] != "f"}))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO / "data" / "bench",
        help="folder of class folders of JPEGs; made by make_images.py when missing (default data/bench)",
    )
    parser.add_argument("--count", type=int, default=1024, help="images to make when --data is missing (default 1024)")
    parser.add_argument("--views", default="1,4,10", help="comma-separated M values (default 1,4,10)")
    parser.add_argument("--methods", default="abcdefw", help="which of a-f and w to run (default abcdefw)")
    parser.add_argument("--batch", type=int, default=32, help="samples per batch B (default 32)")
    parser.add_argument("--size", type=int, default=224, help="view size (default 224)")
    parser.add_argument("--threads", type=int, default=2, help="DataLoader workers / DALI threads (default 2)")
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per (method, M) (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--replot", action="store_true", help="only redraw peers.png and peers.md from --out/peers.json"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results",
        help="where peers.json, peers.md (tables) and peers.png go (default benchmarks/results)",
    )
    args = parser.parse_args(argv)
    try:
        args.views = [int(v) for v in args.views.split(",")]
    except ValueError:
        parser.error(f"--views must be comma-separated integers, got {args.views!r}")
    if not args.views or min(args.views) < 1:
        parser.error(f"--views must be >= 1, got {args.views}")
    if not args.methods or set(args.methods) - set(METHODS):
        parser.error(f"--methods must be letters from {''.join(METHODS)}, got {args.methods!r}")
    for name in ("batch", "size", "threads", "epochs", "count"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.methods = [m for m in METHODS if m in args.methods]
    return args


def report(record: dict, out: Path) -> None:
    """peers.md and peers.png from a run's record (the content of peers.json)."""
    text = markdown(record["results"], record["ratios"])
    if "decoded_share" in record:  # runs before the ROI decode have none
        text += "\n| M | pixels (a) decodes: its views' region, share of the image (mean over the files) |\n"
        text += "| ---: | ---: |\n"
        text += "".join(f"| {m} | {100 * share:.0f} % |\n" for m, share in record["decoded_share"].items())
    (out / "peers.md").write_text(text)
    m, data = record["machine"], record["data"]
    plot(
        record["results"],
        out / "peers.png",
        f"B={record['batch']}, {record['view_size']}px views, {record['threads']} cores ({m['cpu']}), "
        f"{data['files']} JPEGs ~{data['mean_width']:.0f}x{data['mean_height']:.0f}",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        source = args.out / "peers.json"
        if not source.is_file():
            print(f"{PROG}: error: --replot needs {source}", file=sys.stderr)
            return 2
        report(json.loads(source.read_text()), args.out)
        return 0
    if not args.data.exists():
        from benchmarks.make_images import write_images

        print(f"making {args.count} benchmark JPEGs in {args.data}", flush=True)
        write_images(args.data, args.count)
    dataset = load_dataset(args.data)
    if len(dataset) < args.batch:
        print(f"{PROG}: error: {args.data} has {len(dataset)} images, fewer than --batch {args.batch}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    info = dict(
        machine=machine(),
        data=data_summary(dataset),
        batch=args.batch,
        view_size=args.size,
        threads=args.threads,
        epochs=args.epochs,
        views=args.views,
        decoded_share=decoded_share(dataset, args.views, args.seed),
    )
    started = time.time()
    results = benchmark(dataset, args)
    info["machine"]["load_average_after"] = os.getloadavg()
    info["wall_s"] = round(time.time() - started, 1)
    rows = ratios(results, args.views)
    print()
    print(table(results, rows))
    shares = ", ".join(f"{100 * share:.0f} % at M = {m}" for m, share in info["decoded_share"].items())
    print(f"(a) decodes of each image its views' region: {shares} (mean share of the pixels)")
    args.out.mkdir(parents=True, exist_ok=True)
    record = dict(info, results=results, ratios=rows)
    (args.out / "peers.json").write_text(json.dumps(record, indent=1) + "\n")
    report(record, args.out)
    print(f"\nwrote peers.json, peers.md, peers.png to {args.out} ({info['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
