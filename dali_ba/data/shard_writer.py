"""Tar shards (WebDataset format) for parallel file systems: write them from a folder or a file list.

    dali-ba shards imagenet/train shards/train --shard-size 1GB
    dali-ba shards imagenet/val shards/val --classes imagenet/train

1.28 M small files cost a metadata operation each on Lustre/GPFS, from every rank, every epoch;
a thousand 1 GB tars cost a thousand opens. Each sample is two tar members, ``<key>.jpg`` (the
encoded file, bytes unchanged) and ``<key>.cls`` (its label as decimal text); each tar gets DALI's
index file (``.idx``, the format of ``wds2idx``, so ``fn.readers.webdataset`` reads the shards as
they are), and the folder a manifest, ``shards.json`` (class names, samples, labels and bytes per
tar), written last: a folder with a manifest is complete. Shards are written by ``--workers``
processes, each to a ``.partial`` name, read back and compared (names, offsets, SHA-256 of every
member) before it takes its final name.

Reading them is :mod:`dali_ba.data.shard_reader`'s (``load_dataset`` calls it): every sample is indexed
as (tar, offset, size), so the loaders keep their random access by dataset index and a run on shards
reshuffles, shards over ranks, resumes and skips broken samples exactly as on the folder it was
written from (and, in the default order, gives the same model bit for bit). Samples are read with
one ``pread`` from a tar opened once per process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from dali_ba.data.dataset import load_dataset
from dali_ba.data.shard_reader import FORMAT, INDEX_VERSION, LABEL_EXT, MANIFEST
from dali_ba.errors import UsageError

PROG = "dali-ba shards"
BLOCK = 512  # tar's record size: a header each, data padded to it
UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '512MiB' -> 2**29, '4096' -> 4096 bytes."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?[iI]?)[bB]?\s*", text)
    if not found or (found.group(2).upper() == "I"):
        raise UsageError(f"--shard-size must be a size like 1GB, 512MiB or 1000000, got {text!r}")
    value = int(float(found.group(1)) * UNITS[found.group(2).upper()])
    if value < 1:
        raise UsageError(f"--shard-size must be at least 1 byte, got {text!r}")
    return value


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _tar_bytes(members: int) -> int:
    """A tar's size from its members' bytes: two zero blocks end it, then padding to tar's 10 KiB record."""
    return -(-(members + 2 * BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def plan_shards(sizes: Sequence[int], shard_size: int) -> list[range]:
    """Consecutive samples per shard, each shard's tar at most ``shard_size`` bytes (a sample larger
    than that gets a shard of its own). A sample costs two headers, its padded bytes and a label block."""
    shards, start, used = [], 0, 0
    for i, size in enumerate(sizes):
        cost = 2 * BLOCK + _padded(size) + BLOCK
        if i > start and _tar_bytes(used + cost) > shard_size:
            shards.append(range(start, i))
            start, used = i, 0
        used += cost
    shards.append(range(start, len(sizes)))
    return shards


def member_keys(names: Sequence[str]) -> list[str]:
    """WebDataset keys from sample names ('class/stem'): no dots (the extension starts at the first
    dot after the last slash), no spaces (DALI's index is space-separated), unique."""
    keys, seen = [], set()
    for i, name in enumerate(names):
        key = re.sub(r"[.\s]", "_", name)
        if key in seen:
            key = f"{key}_{i}"
        seen.add(key)
        keys.append(key)
    return keys


def write_shard(tar_path: str, samples: list[tuple[str, str, str, int]]) -> dict:
    """Write one tar of ``samples`` (source path, key, image extension, label) and its DALI index,
    read both back and compare, then give them their final names. Returns its manifest entry."""
    partial = tar_path + ".partial"
    written, digests = [], []
    with tarfile.open(partial, "w", format=tarfile.GNU_FORMAT) as tar:
        for source, key, ext, label in samples:
            with open(source, "rb") as file:
                data = file.read()
            row = []
            for member_ext, payload in ((ext, data), (LABEL_EXT, str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{member_ext}")
                info.size, info.mode, info.mtime = len(payload), 0o444, 0
                tar.addfile(info, io.BytesIO(payload))
                row.append((member_ext, tar.offset - _padded(len(payload)), len(payload), info.name))
                digests.append(hashlib.sha256(payload).digest())
            written.append(row)
    index_text = f"{INDEX_VERSION} {len(written)}\n" + "".join(
        " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in row) + "\n" for row in written
    )
    index_path = str(Path(tar_path).with_suffix(".idx"))
    Path(index_path + ".partial").write_text(index_text)
    _verify(partial, written, digests)
    os.replace(partial, tar_path)
    os.replace(index_path + ".partial", index_path)
    return dict(
        tar=Path(tar_path).name,
        index=Path(index_path).name,
        samples=len(samples),
        bytes=os.path.getsize(tar_path),
        labels=[label for *_, label in samples],
    )


def _verify(tar_path: str, written: list[list[tuple]], digests: list[bytes]) -> None:
    """The tar as read back by tarfile: the same members at the same offsets, with the same bytes."""
    expected = [(name, offset, size) for row in written for _, offset, size, name in row]
    with tarfile.open(tar_path, "r:") as tar:
        found = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
    if found != expected:
        raise RuntimeError(f"{tar_path}: members read back differ from those written")
    with open(tar_path, "rb") as file:
        for (name, offset, size), digest in zip(expected, digests):
            file.seek(offset)
            if hashlib.sha256(file.read(size)).digest() != digest:
                raise RuntimeError(f"{tar_path}: member {name} reads back different bytes")


def write_shards(
    dataset, out: str | os.PathLike, shard_size: int, workers: int = 1, shuffle_seed: int | None = None, progress=None
) -> dict:
    """Write ``dataset`` (an :class:`~dali_ba.data.dataset.ImageDataset` of files) as shards in
    ``out`` (new or empty). In the dataset's order unless ``shuffle_seed`` is given (shuffled shards
    suit sequential readers such as ``fn.readers.webdataset``; dali-ba's own loader reads in any order)."""
    if dataset.members is not None:
        raise UsageError(f"{dataset.source} is already shards; write shards from a folder or a file list")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output {out} exists and is not an empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out} ({exc.strerror or exc})") from None
    order = np.arange(len(dataset))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(dataset))
    files = [dataset.files[i] for i in order]
    labels = [dataset.labels[i] for i in order]
    root = Path(dataset.source) if Path(dataset.source).is_dir() else None
    names = [str(Path(f).relative_to(root).with_suffix("")) if root else Path(f).stem for f in files]
    keys = member_keys(names)
    exts = [Path(f).suffix.lstrip(".").lower() or "jpg" for f in files]
    plan = plan_shards([os.path.getsize(f) for f in files], shard_size)
    digits = max(6, len(str(len(plan) - 1)))
    jobs = [
        (str(out / f"shard-{n:0{digits}d}.tar"), [(files[i], keys[i], exts[i], labels[i]) for i in part])
        for n, part in enumerate(plan)
    ]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        entries = []
        for entry in pool.map(write_shard, *zip(*jobs)):
            entries.append(entry)
            if progress:
                progress(entry)
    manifest = dict(
        format=FORMAT,
        source=str(dataset.source),
        classes=list(dataset.classes),
        samples=len(dataset),
        shuffle_seed=shuffle_seed,
        shards=entries,
    )
    (out / (MANIFEST + ".partial")).write_text(json.dumps(manifest))
    os.replace(out / (MANIFEST + ".partial"), out / MANIFEST)
    return manifest


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    from dali_ba.errors import OneLineParser

    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("src", help="folder of class folders, or a '<path> <label>' .txt list")
    parser.add_argument("out", help="new (or empty) folder for the shards")
    parser.add_argument("--shard-size", default="1GB", help="largest tar, e.g. 1GB, 256MiB (default: 1GB)")
    parser.add_argument("--classes", metavar="TRAIN", help="label by the class folders of TRAIN (for validation data)")
    parser.add_argument("--workers", type=int, default=0, help="processes writing shards (default: usable cores)")
    parser.add_argument("--shuffle-seed", type=int, help="shuffle samples across shards (for sequential readers)")
    args = parser.parse_args(argv)
    try:
        if args.workers < 0:
            raise UsageError(f"--workers must be >= 0, got {args.workers}")
        shard_size = parse_size(args.shard_size)
        classes = load_dataset(args.classes).classes if args.classes else None
        dataset = load_dataset(args.src, classes)
        workers = args.workers or len(os.sched_getaffinity(0))
        started = time.perf_counter()
        done = []

        def progress(entry: dict) -> None:
            done.append(entry)
            if len(done) % 50 == 0:
                print(f"{len(done)} shards written", flush=True)

        manifest = write_shards(dataset, args.out, shard_size, workers, args.shuffle_seed, progress)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    total = sum(entry["bytes"] for entry in manifest["shards"])
    print(
        f"wrote {len(manifest['shards'])} shards, {manifest['samples']} samples, {total / 1e6:.1f} MB to {args.out} "
        f"in {elapsed:.1f} s ({workers} workers), each read back and verified"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
