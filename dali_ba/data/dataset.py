"""The sample index: an ImageNet-style folder, a file list or tar shards turned into the data set's
list of files and labels, once, before anything is read for training (that is the loaders' reader,
:mod:`dali_ba.loading.reader`).

Pure Python and cheap, so every data problem is reported before a DALI pipeline or a model exists.
Each indexing function (``scan_folder``, ``read_file_list``, ``load_dataset`` for any of them) returns
an :class:`~dali_ba.data.samples.ImageDataset` (importable from here too); tar shards are indexed by
:mod:`dali_ba.data.shard_reader`.
"""

from __future__ import annotations

import array
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dali_ba.data.file_list import read_list_columns
from dali_ba.data.path_table import LabelArray, PathTable, smallest_int
from dali_ba.data.samples import ImageDataset
from dali_ba.data.shard_reader import is_shard_source, read_shards
from dali_ba.errors import UsageError

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "load_dataset", "read_file_list", "scan_folder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_folder(root: str | os.PathLike[str], classes: Sequence[str] | None = None) -> ImageDataset:
    """Index ``root/<class>/<image>`` (classes sorted by name, labels 0..C-1, as torchvision does).

    Pass the training set's ``classes`` when indexing validation data, so that a label means the
    same class in both even when a class folder is missing from one of them.
    """
    root = Path(root)
    if not root.exists():
        raise UsageError(f"data directory not found: {root}")
    if not root.is_dir():
        raise UsageError(f"data path is not a directory: {root}")
    try:
        found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    except OSError as exc:
        raise UsageError(f"cannot read data directory {root} ({exc.strerror or exc})") from None
    if not found:
        raise UsageError(f"no class folders in {root} (expected {root}/<class>/<image>.jpg)")
    classes = list(classes) if classes is not None else found
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise UsageError(f"class folder {root / unknown[0]} is not one of the {len(classes)} training classes")
    names = bytearray()  # every file name's bytes, one buffer (not 1.28 M strings at once)
    offsets = array.array("q", [0])
    counts: list[int] = []
    labels: list[int] = []
    for name in found:
        label = classes.index(name)
        try:
            with os.scandir(root / name) as entries:  # scandir: no stat() per file on a parallel file system
                images = sorted(entry.name for entry in entries if _is_image(entry.name) and entry.is_file())
        except OSError as exc:
            raise UsageError(f"cannot read class folder {root / name} ({exc.strerror or exc})") from None
        if not images:
            raise UsageError(f"class folder has no images: {root / name}")
        for image in images:
            names += os.fsencode(image)  # as PathTable keeps names: any file name round-trips
            offsets.append(len(names))
        counts.append(len(images))
        labels.append(label)
    group = np.repeat(np.arange(len(found)), counts).astype(smallest_int(len(found) - 1, signed=False))
    files = PathTable(
        os.path.join(str(root), ""),
        [f"{name}/" for name in found],
        group,
        bytes(names),
        np.frombuffer(offsets, dtype=np.int64).astype(smallest_int(len(names), signed=False)),
    )
    return ImageDataset(files, LabelArray(np.asarray(labels)[group]), tuple(classes), str(root))


def read_file_list(list_path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Index a text file of ``<path> <label>`` lines (DALI's file_list format).

    Relative paths are taken from ``root`` (default: the list's own folder). Blank lines and lines
    starting with ``#`` are skipped. The list is trusted: no path is looked at here (at 1.28 M lines a
    stat each is minutes on a parallel file system); one that cannot be read is a broken file when
    training reads it (named, refilled, counted against ``--max-bad-files``). ``dali-ba check-data``
    reads every file before a long job.
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise UsageError(f"file list not found: {list_path}")
    base = str(Path(root) if root is not None else list_path.parent)
    base = "" if base == "." else os.path.join(base, "")
    try:
        columns = read_list_columns(list_path, base)
    except OSError as exc:
        raise UsageError(f"cannot read file list {list_path} ({exc.strerror or exc})") from None
    if not len(columns):
        raise UsageError(f"file list has no entries: {list_path}")
    files, label_array = columns.index()
    classes = tuple(str(c) for c in range(label_array.max() + 1))
    return ImageDataset(files, label_array, classes, str(list_path))


def load_dataset(path: str | os.PathLike[str], classes: Sequence[str] | None = None) -> ImageDataset:
    """A folder of class folders (labels by ``classes`` when given), a ``.txt`` file list, or tar
    shards: a folder of ``.tar`` files, one ``.tar``, or a comma-separated list of them."""
    if is_shard_source(path) and not _has_class_folders(Path(path)):
        return read_shards(path, classes)
    path = Path(path)
    if path.suffix == ".txt" and not path.is_dir():
        return read_file_list(path)
    return scan_folder(path, classes)


def _has_class_folders(path: Path) -> bool:
    try:
        return path.is_dir() and any(entry.is_dir() and not entry.name.startswith(".") for entry in os.scandir(path))
    except OSError:
        return False
