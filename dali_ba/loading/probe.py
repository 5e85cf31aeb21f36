"""Is one image file fit to train on? The probes behind the loaders' bad-file refills and
``dali-ba check-data``: a full decode, a quick header-and-trailer read, and the header's pixel count
against ``--max-image-pixels``; each answers with the reason a file is bad, or None.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import partial
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from dali_ba.data.samples import ImageDataset

TRAILERS = {b"\xff\xd8": b"\xff\xd9", b"\x89PNG\r\n\x1a\n": b"IEND\xaeB`\x82"}


def decode_problem(path: str | IO[bytes]) -> str | None:
    """Why ``path`` (a path or an open file) cannot be fully decoded as an image (None: it can)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                return f"empty image ({image.width}x{image.height})"
    except Exception as exc:
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
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return text.replace("\t", " ")[:200]
    return None


def size_problem(image: str | IO[bytes], max_pixels: int) -> str | None:
    """An image whose header says it has more than ``max_pixels`` pixels: the loaders skip it as a
    broken file without decoding it (:mod:`dali_ba.loading.reader`), and so does this check."""
    from dali_ba.loading.reader import ImageTooLarge, header_size, pixels_problem

    if not max_pixels:
        return None
    try:
        return pixels_problem(*header_size(image), max_pixels)
    except ImageTooLarge as exc:
        return (
            f"{exc.pixels} pixels, more than --max-image-pixels {max_pixels}: not decoded"
            if exc.pixels > max_pixels
            else None
        )
    except Exception:
        return None
    finally:
        if not isinstance(image, str):
            image.seek(0)


def _check_sample(sample: str | tuple[str, int, int], quick: bool, max_pixels: int = 0) -> str | None:
    """The problem of one sample: a file's path, or (tar, offset, size) of a sample in a shard."""
    source: str | IO[bytes]
    if isinstance(sample, str):
        source = sample
    else:
        from dali_ba.data.samples import _pread

        source = io.BytesIO(_pread(*sample))
    return size_problem(source, max_pixels) or (header_problem(source) if quick else decode_problem(source))


def _check_all(
    samples: Sequence[str | tuple[str, int, int]], workers: int, quick: bool, max_pixels: int = 0
) -> list[str | None]:
    check = partial(_check_sample, quick=quick, max_pixels=max_pixels)
    if workers <= 1 or len(samples) < 64:
        return list(map(check, samples))
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(check, samples, chunksize=max(1, min(256, len(samples) // (8 * workers)))))


def check_files(files: list[str], workers: int, quick: bool = False, max_pixels: int = 0) -> dict[str, str]:
    """{path: reason} for every file of ``files`` that fails, checked over ``workers`` processes."""
    return {path: reason for path, reason in zip(files, _check_all(files, workers, quick, max_pixels)) if reason}


def check_samples(
    dataset: ImageDataset, indices: list[int], workers: int, quick: bool = False, max_pixels: int = 0
) -> dict[str, str]:
    """{name: reason} for every sample ``indices`` of ``dataset`` (files or shards) that fails."""
    members = dataset.members
    samples = [
        dataset.files[i]
        if members is None
        else (members.tars[members.shard[i]], int(members.offset[i]), int(members.size[i]))
        for i in indices
    ]
    problems = _check_all(samples, workers, quick, max_pixels)
    return {dataset.files[i]: reason for i, reason in zip(indices, problems) if reason}
