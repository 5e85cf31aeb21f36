"""Check a data set before a long job: decode every file once, list the ones that fail, and why.

    dali-ba check-data DIR|LIST [--out bad_files.txt] [--fix-list good.txt] [--workers N] [--quick]
    srun -n 8 dali-ba check-data /data/imagenet/train --fix-list train_ok.txt

DIR is a folder of class folders or of tar shards, LIST a ``<path> <label>`` file (as --train takes). Each file is
decoded in full by Pillow (what a truncated, empty or non-image file fails), over ``--workers``
processes (default: the cores this process may use); under a launcher with several ranks each rank
takes every rank-th file and rank 0 gathers the answers. ``--quick`` only reads each file's header
and trailer (JPEG SOI/EOI markers, PNG signature and IEND chunk, Pillow's header parse): much faster,
but it misses damage inside the compressed data (docs/data.md says what it missed, measured). Either
way an image whose header says it has more than ``--max-image-pixels`` pixels is bad, as in
training, and is never decoded.

Writes ``--out`` (default: bad_files.txt) with one ``<path>\\t<reason>`` line per bad file, and with
``--fix-list`` a ``<path> <label>`` list of the good files for --train/--val. Exit status: 0 when every
file decoded, 1 when some did not, 2 on bad input.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dali_ba.errors import OneLineParser, UsageError
from dali_ba.loading.probe import check_samples
from dali_ba.recipe import DataConfig

if TYPE_CHECKING:
    from dali_ba.distributed.world import World

PROG = "dali-ba check-data"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("data", help="folder of class folders, or a '<path> <label>' .txt list")
    parser.add_argument("--out", default="bad_files.txt", help="where the bad files go (default: bad_files.txt)")
    parser.add_argument("--fix-list", metavar="OUT.txt", help="also write a '<path> <label>' list of the good files")
    parser.add_argument(
        "--workers", type=int, default=0, help="processes per rank (default: the usable cores / local ranks)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="header and trailer only, no decode (fast, misses inner damage)"
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DataConfig.max_image_pixels,
        metavar="N",
        help="an image whose header says it has more pixels is bad (as in training), never decoded; "
        "0: no limit (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.max_image_pixels < 0:
        parser.error(f"--max-image-pixels must be >= 0, got {args.max_image_pixels}")
    try:
        from dali_ba.data.dataset import load_dataset

        dataset = load_dataset(args.data)
        if args.fix_list and dataset.members is not None:
            raise UsageError(
                f"--fix-list writes a file list, and {args.data} is tar shards: check the folder they were "
                "written from, or rewrite them from its fixed list"
            )
        for target in (args.out, args.fix_list):
            if target and not Path(target).resolve().parent.is_dir():
                raise UsageError(f"cannot write {target}: its folder does not exist")
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    world = _world()
    workers = args.workers or max(1, len(os.sched_getaffinity(0)) // world.local_size)
    started = time.perf_counter()
    bad = check_samples(
        dataset, list(range(world.rank, len(dataset), world.size)), workers, args.quick, args.max_image_pixels
    )
    elapsed = time.perf_counter() - started
    parts = world.gather((bad, elapsed, workers))
    world.close()
    if not world.is_root:
        return 0
    bad = {path: reason for part, _, _ in parts for path, reason in part.items()}
    cores = sum(w for _, _, w in parts)
    slowest = max(e for _, e, _ in parts)
    Path(args.out).write_text("".join(f"{path}\t{bad[path]}\n" for path in dataset.files if path in bad))
    if args.fix_list:
        Path(args.fix_list).write_text(
            "".join(f"{path} {label}\n" for path, label in zip(dataset.files, dataset.labels) if path not in bad)
        )
    rate = len(dataset) / slowest if slowest else float("inf")
    print(
        f"checked {len(dataset)} files ({'header and trailer' if args.quick else 'full decode'}) in {slowest:.1f} s "
        f"on {world.size} rank(s) x {cores // world.size} worker(s): {rate:.0f} files/s, {rate / cores:.0f} per core; "
        f"{len(bad)} bad"
    )
    for path in list(bad)[:10]:
        print(f"  {path}: {bad[path]}")
    if len(bad) > 10:
        print(f"  ... {len(bad) - 10} more")
    print(
        f"wrote {args.out}" + (f" and {args.fix_list} ({len(dataset) - len(bad)} good files)" if args.fix_list else "")
    )
    return 1 if bad else 0


def _world() -> World:
    """The ranks, when a launcher started several (else one process, without importing torch)."""
    from dali_ba.distributed.launcher import detect_launch

    if detect_launch().size <= 1:
        from dali_ba.distributed.world import World

        return World()
    from dali_ba.distributed.join import init_world

    return init_world("auto", device_type="cpu")


if __name__ == "__main__":
    sys.exit(main())
