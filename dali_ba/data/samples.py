"""Where a dataset's samples are, and how their encoded bytes are read: files on disk, or byte ranges
of tar shards. The record every indexing function of :mod:`dali_ba.data.dataset` returns and the loaders read.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO

import numpy as np

from dali_ba.data.path_table import LabelArray, PathTable, smallest_int
from dali_ba.errors import UsageError


@dataclass(frozen=True)
class ImageDataset:
    """File paths, integer labels and class names, in a fixed (sorted) order.

    ``files`` is a :class:`~dali_ba.data.path_table.PathTable` and ``labels`` a
    :class:`~dali_ba.data.path_table.LabelArray`: compact, immutable sequences of str and int (any
    sequences given are turned into them). For tar shards, ``files`` are the samples' names
    (``<tar>:<member>``) and ``members`` says where their bytes are (:class:`ShardMembers`,
    :mod:`dali_ba.data.shard_reader`); ``None`` for files on disk.
    """

    files: PathTable
    labels: LabelArray
    classes: tuple[str, ...]
    source: str
    members: ShardMembers | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.files, PathTable):
            object.__setattr__(self, "files", PathTable.from_paths(self.files))
        if not isinstance(self.labels, LabelArray):
            object.__setattr__(self, "labels", LabelArray(self.labels))
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def index_bytes(self) -> int:
        """Bytes of this data set's index: paths, labels and where shard members are."""
        members = self.members.nbytes if self.members is not None else 0
        return self.files.nbytes + self.labels.nbytes + members

    def fingerprint(self) -> str:
        """SHA-256 of what the index holds (sample count, paths relative to the data set's root, labels,
        classes, shard byte ranges): equal for the same data, wherever it is mounted. Computed once (the
        index is immutable): start-up asks for it more than once, and at 1.28 M samples it costs a pass."""
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return str(cached)
        digest = hashlib.sha256()
        self.files.digest_into(digest)
        self.labels.digest_into(digest)
        digest.update("\0".join(self.classes).encode())
        if self.members is not None:
            for column in (self.members.shard, self.members.offset, self.members.size):
                digest.update(np.asarray(column).astype("<i8").tobytes())
        self.__dict__["_fingerprint"] = digest.hexdigest()  # not a field: equality and repr ignore it
        return str(self.__dict__["_fingerprint"])

    def __getstate__(self) -> dict[str, object]:
        """Pickled (broadcast) without the cached fingerprint: a receiving rank computes its own from
        the index it holds."""
        return {key: value for key, value in self.__dict__.items() if key != "_fingerprint"}

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

    @classmethod
    def compact(cls, tars: Iterable[str], shard: object, offset: object, size: object) -> ShardMembers:
        """Members in the narrowest arrays that hold them: shard numbers (u)int16/32, offsets int64,
        sizes uint32 (a sample under 4 GiB)."""
        tars = tuple(tars)
        sizes = np.asarray(size, dtype=np.int64)
        size_type = np.uint32 if not len(sizes) or int(sizes.max()) < 2**32 else np.int64
        return cls(
            tars,
            np.asarray(shard).astype(smallest_int(max(len(tars) - 1, 0), signed=False)),
            np.asarray(offset, dtype=np.int64),
            sizes.astype(size_type),
        )

    @property
    def nbytes(self) -> int:
        return int(self.shard.nbytes + self.offset.nbytes + self.size.nbytes) + sum(len(t) for t in self.tars)


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
