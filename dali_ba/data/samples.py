"""Where a dataset's samples are, and how their encoded bytes are read: files on disk, or byte ranges
of tar shards. The record every indexing function of :mod:`dali_ba.data.dataset` returns and the loaders read.
"""
from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from typing import IO

import numpy as np

from dali_ba.errors import UsageError


@dataclass(frozen=True)
class ImageDataset:
    """Absolute file paths, integer labels and class names, in a fixed (sorted) order.

    For tar shards, ``files`` are the samples' names (``<tar>:<member>``) and ``members`` says where
    their bytes are (:class:`ShardMembers`, :mod:`dali_ba.data.shard_reader`); ``None`` for files on disk.
    """

    files: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    source: str
    members: ShardMembers | None = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def read(self, index: int) -> bytes:
        """The encoded bytes of sample ``index`` (from its file, or its byte range in a shard)."""
        if self.members is None:
            with open(self.files[index], "rb") as file:
                return file.read()
        return self.members.read(index)

    def open(self, index: int) -> str | IO[bytes]:
        """Sample ``index`` as something Pillow opens: its path, or its bytes from a shard."""
        if self.members is None:
            return self.files[index]
        return io.BytesIO(self.members.read(index))


@dataclass(frozen=True, eq=False)
class ShardMembers:
    """Where each sample's encoded bytes are: ``tars[shard[i]]`` from byte ``offset[i]``, ``size[i]`` long."""

    tars: tuple[str, ...]
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray

    def read(self, index: int) -> bytes:
        """The encoded bytes of sample ``index`` (one pread; each tar is opened once per process)."""
        return _pread(self.tars[self.shard[index]], int(self.offset[index]), int(self.size[index]))


_OPEN_TARS: dict[tuple[int, str], int] = {}  # (pid, path) -> descriptor: opened once per process
_OPENING = threading.Lock()


def _pread(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes of ``path`` from ``offset`` (safe from several threads: pread has no file position)."""
    key = (os.getpid(), path)
    fd = _OPEN_TARS.get(key)
    if fd is None:
        with _OPENING:
            fd = _OPEN_TARS.get(key)
            if fd is None:
                fd = _OPEN_TARS[key] = os.open(path, os.O_RDONLY)
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise UsageError(f"shard {path} is truncated: {size} bytes expected at offset {offset}, {len(data)} read")
    return data
