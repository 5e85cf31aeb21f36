"""The compact columns of a data set's index: its sample paths (:class:`PathTable`) and labels
(:class:`LabelArray`), a few numpy arrays instead of a Python object per sample.

ImageNet is 1,281,167 files: as a tuple of Python strings its paths take about 120 bytes each, on
every rank, and travel badly between ranks. A :class:`PathTable` keeps the data set's root once,
each folder (or tar shard) once as a prefix relative to it, and per sample only a prefix number and
the file name, as one bytes buffer with offsets: about 28 bytes per ImageNet sample, labels
included, pickled (broadcast) as a handful of buffers. Both read as the immutable sequences they
replace: ``files[i]`` is the full path, ``labels[i]`` an int, and they equal tuples of the same items.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, SupportsIndex, overload

import numpy as np

__all__ = ["LabelArray", "PathTable", "smallest_int"]

_ENCODING, _ERRORS = "utf-8", "surrogateescape"  # as os.fsencode: any file name round-trips


def smallest_int(largest: int, signed: bool = True) -> type[np.integer[Any]]:
    """The narrowest of (u)int16, (u)int32, int64 that holds 0..``largest``."""
    for kind in (np.int16, np.int32) if signed else (np.uint16, np.uint32):
        if largest <= np.iinfo(kind).max:
            return kind
    return np.int64


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class PathTable(Sequence[str]):
    """Sample paths as ``root + prefixes[group[i]] + name i``: the root once, each folder (or shard)
    once, per sample a prefix number and its name's bytes in one buffer (``names[offsets[i]:offsets[i+1]]``).

    Immutable; ``table[i]`` is the full path (a str), a slice is a table, iteration yields paths, and a
    table equals another or a tuple or list of the same paths, in the same order.
    """

    __slots__ = ("root", "prefixes", "group", "names", "offsets")

    root: str
    prefixes: tuple[str, ...]
    group: np.ndarray
    names: bytes
    offsets: np.ndarray

    def __init__(
        self, root: str, prefixes: Sequence[str], group: np.ndarray, names: bytes, offsets: np.ndarray
    ) -> None:
        if len(offsets) != len(group) + 1:
            raise ValueError(f"{len(group)} samples need {len(group) + 1} offsets, got {len(offsets)}")
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "prefixes", tuple(prefixes))
        object.__setattr__(self, "group", _frozen(np.asarray(group)))
        object.__setattr__(self, "names", bytes(names))
        object.__setattr__(self, "offsets", _frozen(np.asarray(offsets)))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a PathTable is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (PathTable, (self.root, self.prefixes, self.group, self.names, self.offsets))

    # --- building ---------------------------------------------------------------------------------

    @classmethod
    def from_groups(cls, root: str, prefixes: Sequence[str], names: Sequence[str], group: Iterable[int]) -> PathTable:
        """A table of ``root + prefixes[group[i]] + names[i]`` (``group``: one prefix number per name)."""
        dtype = smallest_int(max(len(prefixes) - 1, 0), signed=False)
        if isinstance(group, np.ndarray):
            group = group.astype(dtype, copy=False)
        else:
            group = np.fromiter(group, dtype=dtype, count=len(names))
        # One join and one encode for all names; the offsets from where the separators fell (a file
        # name never holds NUL): no Python step per name (1.28 M of them).
        joined = np.frombuffer("\0".join(names).encode(_ENCODING, _ERRORS), dtype=np.uint8)
        encoded = joined[joined != 0].tobytes()
        offsets = np.zeros(len(names) + 1, dtype=smallest_int(len(encoded), signed=False))
        if names:
            offsets[1:] = np.append(np.flatnonzero(joined == 0), len(joined)) - np.arange(len(names))
        return cls(root, prefixes, group, encoded, offsets)

    @classmethod
    def from_paths(cls, paths: Iterable[str]) -> PathTable:
        """A table of ``paths`` (any strings): grouped by folder, the folders' common part kept once."""
        if isinstance(paths, PathTable):
            return paths
        folders: dict[str, int] = {}
        names: list[str] = []
        group: list[int] = []
        for path in paths:
            folder, slash, name = path.rpartition("/")
            number = folders.setdefault(folder + slash, len(folders))
            names.append(name)
            group.append(number)
        prefixes = list(folders)
        root = os.path.commonprefix(prefixes) if prefixes else ""
        root = root[: root.rfind("/") + 1]
        return cls.from_groups(root, [p[len(root) :] for p in prefixes], names, group)

    # --- reading ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.group)

    @overload
    def __getitem__(self, index: SupportsIndex) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> PathTable: ...

    def __getitem__(self, index: SupportsIndex | slice) -> str | PathTable:
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.root + self.prefixes[int(self.group[i])] + self.names[start:end].decode(_ENCODING, _ERRORS)

    def __iter__(self) -> Iterator[str]:
        root, prefixes, names = self.root, self.prefixes, self.names
        ends = self.offsets.tolist()
        for i, number in enumerate(self.group.tolist()):
            yield root + prefixes[number] + names[ends[i] : ends[i + 1]].decode(_ENCODING, _ERRORS)

    def paths(self, indices: Iterable[SupportsIndex]) -> list[str]:
        """The paths of samples ``indices``, in order."""
        return [self[i] for i in indices]

    def take(self, indices: np.ndarray | Sequence[int]) -> PathTable:
        """A table of the samples ``indices``, in order (the same root and prefixes)."""
        indices = np.asarray(indices, dtype=np.int64)
        starts, ends = self.offsets[indices].astype(np.int64), self.offsets[indices + 1].astype(np.int64)
        view = memoryview(self.names)
        names = b"".join(view[s:e] for s, e in zip(starts.tolist(), ends.tolist()))
        offsets = np.zeros(len(indices) + 1, dtype=self.offsets.dtype)
        np.cumsum(ends - starts, out=offsets[1:])
        return PathTable(self.root, self.prefixes, self.group[indices], names, offsets)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PathTable):
            if len(self) != len(other):
                return False
            if (self.root, self.prefixes) == (other.root, other.prefixes):
                return (
                    self.names == other.names
                    and np.array_equal(self.group, other.group)
                    and np.array_equal(self.offsets, other.offsets)
                )
            return all(a == b for a, b in zip(self, other))
        if isinstance(other, (tuple, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((len(self), self[0] if len(self) else None))

    def __repr__(self) -> str:
        shown = ", ".join(repr(path) for path in self.paths(range(min(2, len(self)))))
        return f"PathTable({len(self)} paths under {self.root!r}: {shown}{', ...' if len(self) > 2 else ''})"

    @property
    def nbytes(self) -> int:
        """Bytes this table holds (the per-sample arrays and buffer, the root and prefixes)."""
        return (
            len(self.names)
            + self.offsets.nbytes
            + self.group.nbytes
            + len(self.root)
            + sum(len(p) for p in self.prefixes)
        )

    def digest_into(self, digest: Any) -> None:
        """Add what this table holds, less its root, to a hashlib ``digest``: the same for the same data set
        wherever it is (a copy moved to another file system keeps its digest)."""
        digest.update(len(self).to_bytes(8, "little"))
        digest.update("\0".join(self.prefixes).encode(_ENCODING, _ERRORS))
        digest.update(self.group.astype("<i8").tobytes())
        digest.update(self.offsets.astype("<i8").tobytes())
        digest.update(self.names)


class LabelArray(Sequence[int]):
    """Integer labels in the narrowest integer array that holds them (int16 below 32768 classes):
    ``labels[i]`` is an int, a slice another LabelArray, ``np.asarray(labels)`` the array itself, and
    it equals a tuple or list of the same ints."""

    __slots__ = ("array",)

    array: np.ndarray

    def __init__(self, labels: Iterable[int] | np.ndarray) -> None:
        if isinstance(labels, LabelArray):
            array = labels.array
        else:
            values = labels if isinstance(labels, np.ndarray) else np.fromiter(labels, dtype=np.int64)
            largest = int(values.max()) if len(values) else 0
            array = values.astype(np.int32 if largest >= 2**15 else np.int16, copy=False)
        object.__setattr__(self, "array", _frozen(array))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a LabelArray is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (LabelArray, (self.array,))

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, index: SupportsIndex) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> LabelArray: ...

    def __getitem__(self, index: SupportsIndex | slice) -> int | LabelArray:
        if isinstance(index, slice):
            return LabelArray(self.array[index])
        return int(self.array[operator.index(index)])

    def __iter__(self) -> Iterator[int]:
        return iter(self.array.tolist())

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self.array if dtype is None else self.array.astype(dtype)

    def max(self) -> int:
        return int(self.array.max())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LabelArray):
            return np.array_equal(self.array, other.array)
        if isinstance(other, (tuple, list)):
            return len(self) == len(other) and self.array.tolist() == list(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.array.tobytes())

    def __repr__(self) -> str:
        return f"LabelArray({self.array.tolist()[:8]}{'...' if len(self) > 8 else ''}, {self.array.dtype})"

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def digest_into(self, digest: Any) -> None:
        """Add the labels to a hashlib ``digest`` (whatever their array's width)."""
        digest.update(self.array.astype("<i8").tobytes())
