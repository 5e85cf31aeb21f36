"""Check a data set before a long job: decode every file once, list the ones that fail, and why.

    python -m dali_ba.check_data DIR|LIST [--out bad_files.txt] [--fix-list good.txt] [--workers N] [--quick]
    srun -n 8 python -m dali_ba.check_data /data/imagenet/train --fix-list train_ok.txt

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

import io
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from typing import IO
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from dali_ba.errors import UsageError
from dali_ba.recipe import DataConfig, OneLineParser

PROG = "python -m dali_ba.check_data"
TRAILERS = {b"\xff\xd8": b"\xff\xd9", b"\x89PNG\r\n\x1a\n": b"IEND\xaeB`\x82"}


def decode_problem(path: str | IO[bytes]) -> str | None:
    """Why ``path`` (a path or an open file) cannot be fully decoded as an image (None: it can)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                return f"empty image ({image.width}x{image.height})"
    except Exception as exc:  # noqa: BLE001 - every failure to decode is the answer
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return text.replace("\t", " ")[:200]
    return None


def header_problem(path: str | IO[bytes]) -> str | None:
    """The quick check: a known signature at the start, its end marker at the end (trailing zero
    padding allowed), and a header Pillow can parse. Nothing is decompressed."""
    try:
        with open(path, "rb") if isinstance(path, str) else nullcontext(path) as file:
            return _header_problem(file)
    except OSError as exc:
        return f"cannot read ({exc.strerror})"


def _header_problem(file: IO[bytes]) -> str | None:
    from PIL import Image

    head = file.read(16)
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - 64))
    tail = file.read().rstrip(b"\0")
    if size == 0:
        return "empty file"
    for signature, trailer in TRAILERS.items():
        if head.startswith(signature):
            if not tail.endswith(trailer):
                return "truncated (no end marker)"
            break
    try:
        file.seek(0)
        with Image.open(file) as image:
            if image.format == "PNG":
                image.verify()  # PNG chunk checksums, cheap; JPEG has none to verify
            if image.width < 1 or image.height < 1:
                return f"empty image ({image.width}x{image.height})"
    except Exception as exc:  # noqa: BLE001
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return text.replace("\t", " ")[:200]
    return None


def size_problem(image: str | IO[bytes], max_pixels: int) -> str | None:
    """An image whose header says it has more than ``max_pixels`` pixels: the loaders skip it as a
    broken file without decoding it (:mod:`dali_ba.reader`), and so does this check."""
    from dali_ba.reader import ImageTooLarge, header_size, pixels_problem

    if not max_pixels:
        return None
    try:
        return pixels_problem(*header_size(image), max_pixels)
    except ImageTooLarge as exc:
        return f"{exc.pixels} pixels, more than --max-image-pixels {max_pixels}: not decoded" if exc.pixels > max_pixels else None
    except Exception:  # noqa: BLE001 - an unreadable header is the other checks' to name
        return None
    finally:
        if not isinstance(image, str):
            image.seek(0)


def _check_sample(sample: str | tuple[str, int, int], quick: bool, max_pixels: int = 0) -> str | None:
    """The problem of one sample: a file's path, or (tar, offset, size) of a sample in a shard."""
    if not isinstance(sample, str):
        from dali_ba.data.shards import _pread

        sample = io.BytesIO(_pread(*sample))
    return size_problem(sample, max_pixels) or (header_problem(sample) if quick else decode_problem(sample))


def _check_all(samples: list, workers: int, quick: bool, max_pixels: int = 0) -> list[str | None]:
    check = partial(_check_sample, quick=quick, max_pixels=max_pixels)
    if workers <= 1 or len(samples) < 64:
        return list(map(check, samples))
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(check, samples, chunksize=max(1, min(256, len(samples) // (8 * workers)))))


def check_files(files: list[str], workers: int, quick: bool = False, max_pixels: int = 0) -> dict[str, str]:
    """{path: reason} for every file of ``files`` that fails, checked over ``workers`` processes."""
    return {path: reason for path, reason in zip(files, _check_all(files, workers, quick, max_pixels)) if reason}


def check_samples(dataset, indices: list[int], workers: int, quick: bool = False, max_pixels: int = 0) -> dict[str, str]:
    """{name: reason} for every sample ``indices`` of ``dataset`` (files or shards) that fails."""
    members = dataset.members
    samples = [dataset.files[i] if members is None else (members.tars[members.shard[i]], int(members.offset[i]),
               int(members.size[i])) for i in indices]
    problems = _check_all(samples, workers, quick, max_pixels)
    return {dataset.files[i]: reason for i, reason in zip(indices, problems) if reason}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("data", help="folder of class folders, or a '<path> <label>' .txt list")
    parser.add_argument("--out", default="bad_files.txt", help="where the bad files go (default: bad_files.txt)")
    parser.add_argument("--fix-list", metavar="OUT.txt", help="also write a '<path> <label>' list of the good files")
    parser.add_argument("--workers", type=int, default=0, help="processes per rank (default: the usable cores / local ranks)")
    parser.add_argument("--quick", action="store_true", help="header and trailer only, no decode (fast, misses inner damage)")
    parser.add_argument("--max-image-pixels", type=int, default=DataConfig.max_image_pixels, metavar="N",
                        help="an image whose header says it has more pixels is bad (as in training), never decoded; "
                             "0: no limit (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.max_image_pixels < 0:
        parser.error(f"--max-image-pixels must be >= 0, got {args.max_image_pixels}")
    try:
        from dali_ba.data.dataset import load_dataset

        dataset = load_dataset(args.data)
        if args.fix_list and dataset.members is not None:
            raise UsageError(f"--fix-list writes a file list, and {args.data} is tar shards: check the folder they were "
                             "written from, or rewrite them from its fixed list")
        for target in (args.out, args.fix_list):
            if target and not Path(target).resolve().parent.is_dir():
                raise UsageError(f"cannot write {target}: its folder does not exist")
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    world = _world()
    workers = args.workers or max(1, len(os.sched_getaffinity(0)) // world.local_size)
    started = time.perf_counter()
    bad = check_samples(dataset, list(range(world.rank, len(dataset), world.size)), workers, args.quick, args.max_image_pixels)
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
        Path(args.fix_list).write_text("".join(f"{path} {label}\n" for path, label in zip(dataset.files, dataset.labels)
                                               if path not in bad))
    rate = len(dataset) / slowest if slowest else float("inf")
    print(f"checked {len(dataset)} files ({'header and trailer' if args.quick else 'full decode'}) in {slowest:.1f} s "
          f"on {world.size} rank(s) x {cores // world.size} worker(s): {rate:.0f} files/s, {rate / cores:.0f} per core; "
          f"{len(bad)} bad")
    for path in list(bad)[:10]:
        print(f"  {path}: {bad[path]}")
    if len(bad) > 10:
        print(f"  ... {len(bad) - 10} more")
    print(f"wrote {args.out}" + (f" and {args.fix_list} ({len(dataset) - len(bad)} good files)" if args.fix_list else ""))
    return 1 if bad else 0


def _world():
    """The ranks, when a launcher started several (else one process, without importing torch)."""
    from dali_ba.launcher import detect_launch

    if detect_launch().size <= 1:
        from dali_ba.distributed import World

        return World()
    from dali_ba.distributed import init_world

    return init_world("auto", device_type="cpu")


if __name__ == "__main__":
    sys.exit(main())
