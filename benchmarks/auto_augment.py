"""How the auto-augment view graph scales with M: its operators, build time and per-batch cost.

    python -m benchmarks.auto_augment [--data data/bench] [--views 1,4,10,16] [--out benchmarks/results]

The GPU path renders ``trivial`` and ``randaugment`` views in DALI on a graph of a view per DALI
sample (B·M of them), one ``select`` of 14 branches per op over all the views, so the graph's size
does not grow with M (it once had a branch per op and per view: M × n × 14 branches, dearer per view
as M grew). This runs that graph (``BatchAugmentLoader(...,
stage="dali")``) on DALI's CPU operators, where every machine can: the graph's operator count, its
build (the first batch ever), the CPU seconds of a batch after it (the process's, all threads), and
views/s. The target: M = 10 costs at most 2.5× M = 4 (linear in M) per batch and to build. A GPU
spreads the per-batch work differently; the operator count and build time are the graph's own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from dali_ba.data.dataset import load_dataset  # noqa: E402
from dali_ba.machine import describe_machine, machine_line  # noqa: E402

PROG = "python -m benchmarks.auto_augment"
AUGMENTS = ("trivial", "randaugment")


def operators(loader) -> int:
    """Operators in the loader's view graph (DALI's serialized graph, as built)."""
    from nvidia.dali.pipeline import Pipeline

    pipe = loader.build_pipeline(0, stage="dali")
    assert isinstance(pipe, Pipeline)
    pipe.build()
    return len(pipe._ops)  # the graph's operator instances once defined (DALI keeps them in order)


def measure(dataset, augment: str, views: int, args) -> dict:
    """The graph's size and build, then batches for ``--seconds``: wall and CPU time per batch."""
    from dali_ba.loading.loader import BatchAugmentLoader
    from dali_ba.recipe import DataConfig

    options = dict(DataConfig().augmentation(), augment=augment, stage="dali")

    def loader() -> BatchAugmentLoader:
        return BatchAugmentLoader(
            dataset, args.batch, views, args.size, decoder="cpu", num_threads=args.threads, seed=0, **options
        )

    count = operators(loader())
    timed = loader()
    start, cpu = time.perf_counter(), time.process_time()
    batches = timed.epoch(0)
    next(batches)
    build_s, build_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    done, epoch, start, cpu = 0, 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < args.seconds or done < 3:
        try:
            next(batches)
        except StopIteration:
            epoch += 1
            batches = timed.epoch(epoch)
            continue
        done += 1
    wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return dict(
        augment=augment,
        views=views,
        operators=count,
        build_s=build_s,
        build_cpu_s=build_cpu_s,
        batches=done,
        batch_s=wall / done,
        batch_cpu_s=cpu_s / done,
        views_per_s=done * args.batch * views / wall,
    )


def ratios(rows: list[dict], small: int, large: int) -> list[dict]:
    """M = ``large`` against M = ``small`` per augmentation: the target is linear, large / small."""
    out = []
    for augment in AUGMENTS:
        by_m = {r["views"]: r for r in rows if r["augment"] == augment}
        if small in by_m and large in by_m:
            for key in ("operators", "build_s", "batch_cpu_s"):
                value = by_m[large][key] / by_m[small][key]
                out.append(dict(augment=augment, measure=key, value=value, target=large / small))
    return out


def markdown(record: dict) -> str:
    lines = [
        "# Auto-augment view graph against M",
        "",
        f"`{PROG}` on {record['machine_line']}. {record['files']} files, B = {record['batch']}, "
        f"{record['size']} px views, {record['threads']} DALI threads, the GPU path's graph on DALI's CPU operators.",
        "",
        "| augment | M | operators | build s | build CPU s | batch s | batch CPU s | views/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in record["results"]:
        lines.append(
            f"| {r['augment']} | {r['views']} | {r['operators']} | {r['build_s']:.2f} | {r['build_cpu_s']:.2f} | "
            f"{r['batch_s']:.3f} | {r['batch_cpu_s']:.3f} | {r['views_per_s']:.0f} |"
        )
    lines += ["", "| augment | measure | M = 10 / M = 4 | target (linear) | |", "| --- | --- | ---: | ---: | --- |"]
    for r in record["ratios"]:
        verdict = "met" if r["value"] <= r["target"] * 1.0001 else "**missed**"
        lines.append(f"| {r['augment']} | {r['measure']} | {r['value']:.2f} | ≤ {r['target']:.2f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "bench", help="JPEG folder (made if missing)")
    parser.add_argument("--views", default="1,4,10,16", help="comma-separated M values (default 1,4,10,16)")
    parser.add_argument("--batch", type=int, default=32, help="samples per batch B (default 32)")
    parser.add_argument("--size", type=int, default=224, help="view size (default 224)")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads (default 2)")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per case (default 8)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="auto_augment.{json,md}")
    args = parser.parse_args(argv)
    try:
        views = sorted({int(v) for v in args.views.split(",")})
    except ValueError:
        parser.error(f"--views takes comma-separated integers, got {args.views!r}")
    if min(views) < 1 or args.batch < 1 or args.seconds <= 0:
        parser.error("--views, --batch and --seconds must be positive")
    if not args.data.exists():
        from benchmarks.make_images import write_images

        print(f"{PROG}: making 1024 benchmark JPEGs in {args.data}", flush=True)
        write_images(args.data, 1024)
    dataset = load_dataset(args.data)
    machine = describe_machine()
    rows = []
    for augment in AUGMENTS:
        for m in views:
            row = measure(dataset, augment, m, args)
            print(f"{PROG}: {json.dumps(row)}", flush=True)
            rows.append(row)
    record = dict(
        machine=machine,
        machine_line=machine_line(machine),
        files=len(dataset),
        batch=args.batch,
        size=args.size,
        threads=args.threads,
        results=rows,
        ratios=ratios(rows, 4, 10),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "auto_augment.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "auto_augment.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
