"""Read tar shards (WebDataset format, as :mod:`dali_ba.data.shard_writer` writes them): index every sample
as (tar, offset, size), from DALI's ``.idx`` files or the tars themselves, labels from the folder's
manifest or each sample's ``.cls`` member.

The loaders keep their random access by dataset index, so a run on shards reshuffles, shards over
ranks, resumes and skips broken samples exactly as on the folder it was written from.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dali_ba.data.path_table import LabelArray, PathTable
from dali_ba.data.samples import ImageDataset, ShardMembers, _pread
from dali_ba.errors import UsageError

MANIFEST = "shards.json"
FORMAT = "dali-ba shards 1"
INDEX_VERSION = "v1.2"  # DALI's webdataset index format (nvidia.dali's wds2idx)
LABEL_EXT = "cls"


def _tar_list(source: str | os.PathLike[str]) -> list[str]:
    """The tars of 'a.tar' or 'a.tar,b.tar' (empty for anything else, a folder with a comma included)."""
    parts = [part.strip() for part in str(source).split(",")]
    return parts if all(part.endswith(".tar") for part in parts) else []


def is_shard_source(path: str | os.PathLike[str]) -> bool:
    """A .tar, a comma-separated list of them, or a folder of them (with no class folders)."""
    if _tar_list(path):
        return True
    folder = Path(path)
    return folder.is_dir() and ((folder / MANIFEST).is_file() or any(folder.glob("*.tar")))


def _parse_index(index_path: Path, tar_path: str) -> list[list[tuple[str, int, int, str]]]:
    """DALI's index: 'v1.2 N', then per sample 'ext offset size name' repeated per member."""
    try:
        lines = index_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read shard index {index_path} ({getattr(exc, 'strerror', None) or exc})") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise UsageError(
            f"shard index {index_path} is not a DALI {INDEX_VERSION} index of its samples "
            f"(rebuild it: wds2idx {tar_path} {index_path})"
        )
    samples = []
    for lineno, line in enumerate(lines[1:], 2):
        parts = line.split()
        if not parts or len(parts) % 4 or not all(p.isdigit() for p in parts[1::4] + parts[2::4]):
            raise UsageError(f"{index_path}:{lineno}: expected 'ext offset size name' per member, got {line[:80]!r}")
        samples.append([(ext, int(off), int(size), name) for ext, off, size, name in zip(*[iter(parts)] * 4)])
    return samples


def _scan_tar(tar_path: str) -> list[list[tuple[str, int, int, str]]]:
    """The index of a tar that has none: its members grouped by key, as wds2idx groups them."""
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (OSError, tarfile.TarError) as exc:
        raise UsageError(f"cannot read shard {tar_path} ({getattr(exc, 'strerror', None) or exc})") from None
    samples: list[list[tuple[str, int, int, str]]]
    samples, last = [], None
    for m in members:
        slash = m.name.rfind("/") + 1
        dot = m.name.find(".", slash)
        key, ext = (m.name[:dot], m.name[dot + 1 :]) if dot >= 0 else (m.name, "")
        if key != last:
            samples.append([])
            last = key
        samples[-1].append((ext, m.offset_data, m.size, m.name))
    return samples


def read_shards(source: str | os.PathLike[str], classes: Sequence[str] | None = None) -> ImageDataset:
    """Index tar shards (a folder of them, one .tar, or 'a.tar,b.tar') as an ImageDataset whose
    ``members`` say where each sample's bytes are. Labels come from the folder's manifest, else from
    each sample's ``.cls`` member; with ``classes`` (the training set's), labels are mapped by class name."""
    tars, manifest = _locate(source)
    names, shard, offset, size, labels = [], [], [], [], []
    for n, tar in enumerate(tars):
        if not Path(tar).is_file():
            raise UsageError(f"shard not found: {tar}")
        index = Path(tar).with_suffix(".idx")
        samples = _parse_index(index, tar) if index.is_file() else _scan_tar(tar)
        expected = manifest["shards"][n] if manifest else None
        if expected and len(samples) != expected["samples"]:
            raise UsageError(f"shard {tar} holds {len(samples)} samples, its manifest says {expected['samples']}")
        tar_bytes = os.path.getsize(tar)
        for i, members in enumerate(samples):
            image = [m for m in members if m[0] != LABEL_EXT]
            if not image:
                raise UsageError(f"shard {tar}: sample {members[0][3]} has no image member")
            ext, off, length, name = image[0]
            if off + length > tar_bytes:
                raise UsageError(
                    f"shard {tar} is truncated: {name} ends at byte {off + length}, the file has {tar_bytes}"
                )
            names.append(name)
            shard.append(n)
            offset.append(off)
            size.append(length)
            if expected:
                labels.append(expected["labels"][i])
            else:
                labels.append(_read_label(tar, members))
    found_classes = tuple(manifest["classes"]) if manifest else tuple(str(c) for c in range(max(labels) + 1))
    if classes is not None and tuple(classes) != found_classes:
        labels, found_classes = _relabel(labels, found_classes, classes, source), tuple(classes)
    located = ShardMembers.compact(tars, shard, offset, size)
    root = os.path.commonprefix(tars)
    root = root[: root.rfind("/") + 1]  # the tars' common folder (empty if they have none)
    # '<tar>:<member>': each tar once as a prefix, the shard number the members' own (one array)
    files = PathTable.from_groups(root, [f"{tar[len(root) :]}:" for tar in tars], names, located.shard)
    return ImageDataset(files, LabelArray(labels), found_classes, str(source), located)


def _locate(source: str | os.PathLike[str]) -> tuple[list[str], dict[str, Any] | None]:
    """The tars of ``source`` in order, and the folder's manifest when it has one."""
    tars = _tar_list(source)
    if tars:
        return tars, None
    folder = Path(source)
    if not (folder / MANIFEST).is_file():
        tars = sorted(str(p) for p in folder.glob("*.tar"))
        if not tars:
            raise UsageError(f"no .tar shards in {source}")
        return tars, None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read shard manifest {folder / MANIFEST} ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{folder / MANIFEST} is not a dali-ba shard manifest ({FORMAT!r})")
    return [str(folder / entry["tar"]) for entry in manifest["shards"]], manifest


def _relabel(
    labels: list[int], found: tuple[str, ...], classes: Sequence[str], source: str | os.PathLike[str]
) -> list[int]:
    """Labels by the training ``classes``' numbering of the same class names."""
    missing = [name for name in found if name not in classes]
    if missing:
        raise UsageError(f"class {missing[0]!r} of shards {source} is not one of the {len(classes)} training classes")
    relabel = [list(classes).index(name) for name in found]
    return [relabel[label] for label in labels]


def _read_label(tar: str, members: list[tuple[str, int, int, str]]) -> int:
    found = [m for m in members if m[0] == LABEL_EXT]
    if not found:
        raise UsageError(f"shard {tar}: sample {members[0][3]} has no .{LABEL_EXT} label member")
    _, off, length, name = found[0]
    text = _pread(tar, off, length).decode(errors="replace").strip()
    if not text.isdigit():
        raise UsageError(f"shard {tar}: label {name} is {text[:20]!r}, not a class number >= 0")
    return int(text)
