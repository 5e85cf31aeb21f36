"""A DALI file list (``<path> <label>`` lines) read into flat columns, a few megabytes at a time.

ImageNet's list is 1.28 M lines. A Python step per line (strip, split, a dict lookup, three appends)
is about a second before the first step of every job; numpy does the same work on a block of lines
at once. A block whose lines are all plain ``<path> <label>`` (no surrounding white space, no
comment, no ``\\r``, no path that pathlib would respell) is read with array operations; any other
block is read line by line, with the same result and the same errors, naming the line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dali_ba.data.path_table import LabelArray, PathTable, smallest_int
from dali_ba.errors import UsageError

__all__ = ["ListColumns", "read_list_columns"]

BLOCK_BYTES = 1 << 20  # a block's per-byte temporaries stay about 10 MB
_MAX_LABEL_DIGITS = 9  # an int32 holds every label of at most 9 digits
_SPACE, _NEWLINE, _SLASH, _DOT, _HASH = (ord(c) for c in " \n/.#")
# Bytes that may be white space to str.strip at the edge of a line (all of non-ASCII, to be safe):
# a line with one there is read line by line.
_EDGE = np.zeros(256, dtype=bool)
_EDGE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
_EDGE[0x80:] = True
_DIGIT = np.zeros(256, dtype=bool)
_DIGIT[ord("0") : ord("9") + 1] = True


@dataclass
class ListColumns:
    """The list's entries as columns: each file's folder (with its trailing ``/``) once in
    ``folders``, per entry a folder number, its name's bytes (one buffer) and its label."""

    folders: dict[str, int] = field(default_factory=dict)
    names: list[bytes] = field(default_factory=list)
    name_lengths: list[np.ndarray] = field(default_factory=list)
    group: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    vector_blocks: int = 0  # blocks read with array operations (the rest line by line)
    line_blocks: int = 0

    def __len__(self) -> int:
        return sum(len(g) for g in self.group)

    def index(self) -> tuple[PathTable, LabelArray]:
        """The columns as the index keeps them, each built at its final width (no wide copy at 1.28 M)."""
        prefixes = list(self.folders)
        common = os.path.commonprefix(prefixes)
        common = common[: common.rfind("/") + 1]
        names = b"".join(self.names)
        self.names.clear()
        offsets = np.zeros(len(self) + 1, dtype=smallest_int(len(names), signed=False))
        np.cumsum(np.concatenate(self.name_lengths), out=offsets[1:])
        group = np.concatenate(self.group, dtype=smallest_int(len(prefixes) - 1, signed=False), casting="unsafe")
        labels = np.concatenate(self.labels)  # int32 (9 digits at most); LabelArray narrows it
        files = PathTable(common, [p[len(common) :] for p in prefixes], group, names, offsets)
        return files, LabelArray(labels)

    def append(self, names: bytes, name_lengths: np.ndarray, group: np.ndarray, labels: np.ndarray) -> None:
        """A block's entries, held narrow (a name is at most 255 bytes on Linux, a label 9 digits)."""
        self.names.append(names)
        wide = len(name_lengths) and int(name_lengths.max()) >= 2**16
        self.name_lengths.append(name_lengths.astype(np.int64 if wide else np.uint16))
        self.group.append(group.astype(np.int32))
        self.labels.append(labels.astype(np.int32))


def read_list_columns(list_path: Path, base: str) -> ListColumns:
    """Every entry of the list at ``list_path``; a relative path is taken from ``base`` (``""`` or a
    folder ending in ``/``). A malformed line is a :class:`UsageError` naming it."""
    columns = ListColumns()
    lineno = 0  # lines before the current block
    with open(list_path, "rb") as stream:
        for block in _blocks(stream):
            try:
                text = block.decode("utf-8") if not block.isascii() else None
            except UnicodeDecodeError as exc:
                raise UsageError(f"cannot read file list {list_path} ({exc})") from None
            if b"\r" not in block and _vector_block(block, base, columns):
                columns.vector_blocks += 1
                lineno += block.count(b"\n")
            else:
                columns.line_blocks += 1
                text = block.decode("ascii") if text is None else text
                lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")[:-1]
                _line_block(lines, lineno, base, columns, list_path)
                lineno += len(lines)
    return columns


def _blocks(stream: BinaryIO) -> Iterable[bytes]:
    """The stream in blocks of whole lines, each ending with ``\\n``."""
    rest = b""
    while chunk := stream.read(BLOCK_BYTES):
        rest += chunk
        end = rest.rfind(b"\n") + 1
        if end:
            yield rest[:end]
            rest = rest[end:]
    if rest:
        yield rest + b"\n"


def _line_block(lines: list[str], lineno: int, base: str, columns: ListColumns, list_path: Path) -> None:
    """Lines read one at a time, as ``str.strip`` and ``pathlib`` read them."""
    names = bytearray()
    lengths: list[int] = []
    group: list[int] = []
    labels: list[int] = []
    for lineno, line in enumerate(lines, lineno + 1):  # noqa: B020 (the line number, counted on)
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, label = line.rpartition(" ")
        path = path.strip()
        if not path or not (label.isascii() and label.isdigit()):
            raise UsageError(f"{list_path}:{lineno}: expected '<path> <label>' with a label >= 0, got {line!r}")
        if len(label.lstrip("0")) > _MAX_LABEL_DIGITS:
            raise UsageError(f"{list_path}:{lineno}: label {label} is too large (at most {_MAX_LABEL_DIGITS} digits)")
        if "//" in path or "/." in path or path.startswith(".") or path.endswith("/"):
            path = str(Path(path))  # as pathlib spells it: no './', '//' or trailing '/'
        folder, slash, name = (path if path.startswith("/") else base + path).rpartition("/")
        group.append(columns.folders.setdefault(folder + slash, len(columns.folders)))
        encoded = os.fsencode(name)  # as PathTable keeps names: any file name round-trips
        names += encoded
        lengths.append(len(encoded))
        labels.append(int(label))
    columns.append(
        bytes(names),
        np.array(lengths, dtype=np.int64),
        np.array(group, dtype=np.int64),
        np.array(labels, dtype=np.int64),
    )


def _vector_block(block: bytes, base: str, columns: ListColumns) -> bool:
    """Read a block of plain lines with array operations; False (nothing read) if any line is not
    plain, for :func:`_line_block` to read it, or to name the line that is wrong."""
    if b"//" in block or b"/." in block:
        return False
    buf = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(buf == _NEWLINE)
    starts = np.concatenate(([0], ends[:-1] + 1))
    nonempty = ends > starts
    keep = nonempty & (buf[np.minimum(starts, len(buf) - 1)] != _HASH)  # blank and comment lines skipped
    start, end = starts[keep], ends[keep]
    if not len(start):
        columns.append(b"", *(np.zeros(0, dtype=np.int64) for _ in range(3)))
        return True
    if _EDGE[buf[start]].any():
        return False
    spaces = np.flatnonzero(buf == _SPACE)
    last = np.searchsorted(spaces, end) - 1  # each line's last space
    if (last < 0).any():
        return False
    space = spaces[last]
    label_digits = end - space - 1
    if (space <= start).any() or (label_digits < 1).any() or (label_digits > _MAX_LABEL_DIGITS).any():
        return False
    before = buf[space - 1]  # the path's last byte
    if _EDGE[before].any() or (before == _SLASH).any() or (buf[start] == _DOT).any():
        return False
    if not _DIGIT[buf[_ranges(space + 1, end)]].all():
        return False
    labels = np.zeros(len(start), dtype=np.int64)
    for place in range(int(label_digits.max())):  # units, tens, ...: a few passes over the lines
        has = label_digits > place
        labels[has] += (buf[end[has] - 1 - place].astype(np.int64) - ord("0")) * 10**place
    slashes = np.flatnonzero(buf == _SLASH)
    last = np.searchsorted(slashes, space) - 1  # each path's last slash, if it has one in its line
    slash = np.where(last >= 0, slashes[np.maximum(last, 0)], -1) if len(slashes) else np.full(len(start), -1)
    name_start = np.where(slash >= start, slash + 1, start)
    names = buf[_ranges(name_start, space)].tobytes()
    group = _folder_numbers(block, buf, start, name_start, base, columns.folders)
    columns.append(names, space - name_start, group, labels)
    return True


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The indices of ``[starts[i], ends[i])`` for every i, in order (the ranges are disjoint)."""
    lengths = ends - starts
    shift = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    indices: np.ndarray = np.arange(int(lengths.sum()), dtype=np.int64) + shift
    return indices


def _folder_numbers(
    block: bytes, buf: np.ndarray, start: np.ndarray, name_start: np.ndarray, base: str, folders: dict[str, int]
) -> np.ndarray:
    """Each line's folder number in ``folders`` (new folders added in order of first sight).

    A list is mostly runs of lines in one folder: a line whose folder bytes equal the line before's
    is in the same folder, compared with arrays; only the first line of a run looks its folder up."""
    length = name_start - start
    same = np.zeros(len(start), dtype=bool)
    candidate = np.flatnonzero(length[1:] == length[:-1]) + 1
    if len(candidate):
        count = length[candidate]
        here = _ranges(start[candidate], start[candidate] + count)
        gap = np.repeat(start[candidate] - start[candidate - 1], count)
        differs = buf[here] != buf[here - gap]
        owner = np.repeat(np.arange(len(candidate)), count)
        same[candidate] = np.bincount(owner[differs], minlength=len(candidate)) == 0
    first = np.flatnonzero(~same)
    numbers = np.empty(len(first), dtype=np.int64)
    for i, line in enumerate(first):
        folder = block[start[line] : name_start[line]].decode("utf-8")
        key = folder if folder.startswith("/") else base + folder
        numbers[i] = folders.setdefault(key, len(folders))
    per_line: np.ndarray = numbers[np.cumsum(~same) - 1]
    return per_line
