"""Folder vs tar shards: the same JPEGs through the same loader, read from files or from shards.

    python -m benchmarks.shards [--data data/bench] [--views 1,4] [--batch 32] [--size 224]
                                [--threads 2] [--epochs 3] [--shard-size 8MB] [--no-cold] [--out benchmarks/results]

Makes the benchmark JPEGs when ``--data`` is missing (``benchmarks.make_images``), writes them as shards
(timed) into a temporary folder, then times ``BatchAugmentLoader`` epochs (cpu decoder, torch
views) on both. Warm: the files are in the page cache (a warm-up epoch each first). Cold: the page
cache is dropped before each such epoch (needs root; skipped otherwise), so every byte comes from
the disk, the case a parallel file system is always in. Epochs are interleaved (folder, shards,
folder, ...) so that a change in load hits both alike; each row gives the fastest epoch and the
mean. An epoch on the folder opens every file (DALI's file reader); on shards, the process opens each
tar once. Writes <out>/shards.json and <out>/shards.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from dali_ba.data.dataset import load_dataset  # noqa: E402
from dali_ba.data.shard_writer import parse_size, write_shards  # noqa: E402
from dali_ba.loading.loader import BatchAugmentLoader  # noqa: E402

SOURCES = ("folder", "shards")


def drop_page_cache() -> bool:
    """Empty the page cache (root only): the next epoch reads every byte from the disk."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def timed_epoch(loader: BatchAugmentLoader, epoch: int) -> dict:
    """One epoch, as a training loop waits for it (pipeline start included)."""
    started = time.perf_counter()
    batches = sum(1 for _ in loader.epoch(epoch))
    seconds = time.perf_counter() - started
    samples = batches * loader.batch_size
    return dict(
        seconds=seconds, samples=samples, samples_per_s=samples / seconds, views_per_s=samples * loader.views / seconds
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shards", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "bench"))
    parser.add_argument("--views", default="1,4", help="M values, comma-separated")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per (source, M, cache)")
    parser.add_argument("--shard-size", default="8MB")
    parser.add_argument(
        "--cold",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time epochs from a dropped page cache (root only)",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    views = [int(v) for v in args.views.split(",")]
    if not Path(args.data).is_dir():
        from benchmarks.make_images import write_images

        write_images(Path(args.data), 1024)
    folder = load_dataset(args.data)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dali-ba-shards-") as tmp:
        started = time.perf_counter()
        manifest = write_shards(folder, Path(tmp) / "shards", parse_size(args.shard_size), workers=args.threads)
        write_s = time.perf_counter() - started
        data = {"folder": folder, "shards": load_dataset(Path(tmp) / "shards")}
        print(f"{len(folder)} files -> {len(manifest['shards'])} shards in {write_s:.1f} s", flush=True)
        loaders = {
            (source, m): BatchAugmentLoader(
                data[source], args.batch, m, args.size, decoder="cpu", num_threads=args.threads
            )
            for source in SOURCES
            for m in views
        }
        for loader in loaders.values():
            timed_epoch(loader, 0)  # warm-up: page cache, pipeline, torch kernels
        caches = ["warm", "cold"] if args.cold and drop_page_cache() else ["warm"]
        epochs = []
        for epoch in range(1, args.epochs + 1):
            for cache in caches:
                for (source, m), loader in loaders.items():
                    if cache == "cold":
                        drop_page_cache()
                    result = dict(source=source, views=m, cache=cache, epoch=epoch, **timed_epoch(loader, epoch))
                    print(
                        f"{cache:4} {source:6} M={m:<2} epoch {epoch}: {result['views_per_s']:7.0f} views/s", flush=True
                    )
                    epochs.append(result)
    rows = []
    for cache in caches:
        for m in views:
            for source in SOURCES:
                mine = [e for e in epochs if (e["source"], e["views"], e["cache"]) == (source, m, cache)]
                rates = np.array([e["views_per_s"] for e in mine])
                rows.append(
                    dict(
                        source=source,
                        views=m,
                        cache=cache,
                        best_views_per_s=float(rates.max()),
                        mean_views_per_s=float(rates.mean()),
                        samples_per_s=float(rates.max() / m),
                    )
                )
    lines = [
        f"{len(folder)} JPEGs from `{args.data}` ({sum(os.path.getsize(f) for f in folder.files) / 1e6:.1f} MB) "
        f"as a folder and as {len(manifest['shards'])} shards of at most {args.shard_size} (written and verified "
        f"in {write_s:.1f} s); B={args.batch}, {args.size} px, cpu decoder, {args.threads} DALI + "
        f"{args.threads} view threads; {args.epochs} timed epochs each, interleaved; {os.cpu_count()} cores, "
        f"load average {load:.2f} at the start.",
        "",
        "| cache | M | folder views/s (best / mean) | shards views/s (best / mean) | shards / folder |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for cache in caches:
        for m in views:
            f, s = (
                next(r for r in rows if (r["source"], r["views"], r["cache"]) == (src, m, cache)) for src in SOURCES
            )
            lines.append(
                f"| {cache} | {m} | {f['best_views_per_s']:.0f} / {f['mean_views_per_s']:.0f} | "
                f"{s['best_views_per_s']:.0f} / {s['mean_views_per_s']:.0f} | "
                f"{s['best_views_per_s'] / f['best_views_per_s']:.2f} |"
            )
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shards.md").write_text("\n".join(lines) + "\n")
    (out / "shards.json").write_text(
        json.dumps(
            {
                "data": args.data,
                "files": len(folder),
                "shards": len(manifest["shards"]),
                "shard_size": args.shard_size,
                "write_s": write_s,
                "batch": args.batch,
                "size": args.size,
                "threads": args.threads,
                "cores": os.cpu_count(),
                "load_at_start": load,
                "python": platform.python_version(),
                "platform": platform.platform(),
                "rows": rows,
                "epochs": epochs,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out / 'shards.md'} and {out / 'shards.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
