"""The data set's index at cluster scale: a compact table (under 64 bytes a sample), a trusted file
list (a missing file is a broken file, not a start-up stat), one listing per job (rank 0 lists, the
others receive it over the engine and touch nothing of the data before they read it), and a data set
changed between a crash and --resume auto refused in one line."""

import dataclasses
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from dali_ba.data.dataset import ImageDataset, load_dataset, read_file_list, scan_folder
from dali_ba.data.path_table import LabelArray, PathTable
from dali_ba.data.samples import ShardMembers
from dali_ba.distributed.world import World
from dali_ba.errors import UsageError
from dali_ba.recipe import load_recipe
from dali_ba.training import shared_index
from dali_ba.training.checkpoint import check_same_data
from dali_ba.training.checkpoint_state import data_identity
from dali_ba.training.shared_index import listed_once, shared_datasets

PY = sys.executable
TRAIN = [PY, "-m", "dali_ba.train", "--recipe", "pipelines/demo.toml"]
MPIRUN = ["mpirun", "-np", "2", *(["--allow-run-as-root"] if os.geteuid() == 0 else [])]
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
IMAGENET_CLASSES = [f"n{1440764 + 37 * c:08d}" for c in range(1000)]


def imagenet_like(samples: int, root: str = "/lustre/datasets/imagenet/train") -> list[str]:
    """``samples`` ImageNet-style paths (<root>/<wnid>/<wnid>_<n>.JPEG), spread over 1,000 classes."""
    per_class = -(-samples // 1000)
    return [f"{root}/{wnid}/{wnid}_{10026 + 7 * i}.JPEG" for wnid in IMAGENET_CLASSES for i in range(per_class)][
        :samples
    ]


# --- the table ---------------------------------------------------------------------------------------


def test_a_path_table_round_trips_its_paths_and_equals_their_tuple():
    paths = ["/d/a/x.jpg", "/d/a/y.jpg", "/d/b/z.JPEG", "/d/b/naïve é.jpg", "/elsewhere/q.png", "rel/r.jpg"]
    table = PathTable.from_paths(paths)
    assert list(table) == paths and table == tuple(paths) and table == paths and tuple(paths) == table
    assert [table[i] for i in range(len(paths))] == paths and table[-1] == paths[-1] and table[np.int64(2)] == paths[2]
    assert table[1:4] == tuple(paths[1:4]) and table.take([5, 0]) == [paths[5], paths[0]]
    assert pickle.loads(pickle.dumps(table)) == table and table != paths[:-1] and table != [*paths[:-1], "x"]
    with pytest.raises(IndexError):
        table[len(paths)]
    with pytest.raises(AttributeError):
        table.root = "/"  # type: ignore[misc]
    bytes_name = os.fsdecode(b"/d/c/latin1-\xe9.jpg")  # not UTF-8: a surrogate escape, as os.listdir gives it
    assert PathTable.from_paths([bytes_name])[0] == bytes_name


def test_an_imagenet_like_index_takes_under_64_bytes_a_sample():
    paths = imagenet_like(100_000)
    labels = [i // 100 for i in range(100_000)]
    dataset = ImageDataset(tuple(paths), tuple(labels), tuple(IMAGENET_CLASSES), "/lustre/datasets/imagenet/train")
    assert dataset.files == tuple(paths) and dataset.labels == tuple(labels)
    assert dataset.files.root == "/lustre/datasets/imagenet/train/" and len(dataset.files.prefixes) == 1000
    assert dataset.labels.array.dtype == np.int16 and dataset.files.group.dtype == np.uint16
    assert dataset.index_bytes / len(dataset) < 64, dataset.index_bytes / len(dataset)
    # tar shards too: '<tar>:<member>' names, and where each member's bytes are
    tars = [f"/lustre/shards/shard-{n:06d}.tar" for n in range(100)]
    shard = np.arange(100_000) // 1000
    members = ShardMembers.compact(tars, shard, np.arange(100_000) * 110_000, np.full(100_000, 109_000))
    # as read_shards lays it out: each tar once ('shard-N.tar:'), per sample its member name ('<wnid>/<file>')
    table = PathTable.from_groups(
        "/lustre/shards/",
        [f"{t.rsplit('/', 1)[1]}:" for t in tars],
        ["/".join(p.rsplit("/", 2)[1:]) for p in paths],
        members.shard,
    )
    shards = ImageDataset(table, tuple(labels), tuple(IMAGENET_CLASSES), "/lustre/shards", members)
    assert shards.files[1001] == f"{tars[1]}:{paths[1001].rsplit('/', 2)[1]}/{paths[1001].rsplit('/', 1)[1]}"
    assert members.shard.dtype == np.uint16 and members.size.dtype == np.uint32 and members.offset.dtype == np.int64
    assert shards.index_bytes / len(shards) < 64, shards.index_bytes / len(shards)
    assert len(pickle.dumps(dataset)) / len(dataset) < 64  # what a broadcast sends


def test_labels_are_the_smallest_integers_that_hold_them():
    assert LabelArray(range(5)).array.dtype == np.int16 and LabelArray([0, 32767]).array.dtype == np.int16
    assert LabelArray([0, 32768]).array.dtype == np.int32
    labels = LabelArray([3, 0, 3])
    assert labels == (3, 0, 3) and labels == [3, 0, 3] and [3, 0, 3] == labels and labels != (3, 0)
    assert max(labels) == labels.max() == 3 and labels.count(3) == 2 and labels[1:] == (0, 3)
    assert list(zip("abc", labels)) == [("a", 3), ("b", 0), ("c", 3)] and isinstance(labels[0], int)
    assert np.asarray(labels).dtype == np.int16 and pickle.loads(pickle.dumps(labels)) == labels


def test_the_index_of_a_folder_is_the_paths_it_held_before(tmp_path):
    """The table gives back exactly what the tuple of paths held: os.scandir's paths, sorted per class."""
    for cls, count in (("b", 3), ("a", 2)):
        (tmp_path / cls).mkdir()
        for i in range(count):
            (tmp_path / cls / f"{i}.jpg").write_bytes(b"x")
    dataset = scan_folder(tmp_path)
    expected = [e.path for c in ("a", "b") for e in sorted(os.scandir(tmp_path / c), key=lambda e: e.name)]
    assert list(dataset.files) == expected and dataset.labels == (0, 0, 1, 1, 1)


# --- one listing: rank 0 lists, the others receive ----------------------------------------------------


def with_data(train: Path, val: Path):
    recipe = load_recipe("demo")
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, train=str(train), val=str(val)))


class StandIn(World):
    """A rank of a two-rank world whose broadcast is a pickle round trip of what rank 0 sent."""

    sent: list[bytes] = []  # the one channel of the stand-in world

    def __init__(self, rank: int) -> None:
        super().__init__(rank, 2)

    def broadcast_object(self, value):
        if self.rank == 0:
            StandIn.sent.append(pickle.dumps(value))
            return value
        return pickle.loads(StandIn.sent.pop(0))


def test_the_receiving_rank_holds_the_index_rank_0_built_and_looks_at_no_data(demo_data, monkeypatch):
    recipe = with_data(demo_data / "train", demo_data / "val")
    listed = shared_datasets(recipe, StandIn(0))
    assert shared_index.index_role()["role"] == "listed"
    looked_at = []
    for name in ("stat", "lstat", "scandir", "listdir", "open", "access"):
        real = getattr(os, name)
        monkeypatch.setattr(
            os, name, lambda *a, _real=real, _name=name, **k: looked_at.append((_name, a)) or _real(*a, **k)
        )
    received = shared_datasets(recipe, StandIn(1))
    monkeypatch.undo()
    assert not [call for call in looked_at if str(demo_data) in str(call)], looked_at
    assert shared_index.index_role() == {"role": "received", "sha256": listed[0].fingerprint()}
    local = (load_dataset(demo_data / "train"), load_dataset(demo_data / "val", classes=listed[0].classes))
    for got, built in zip(received, local):  # element for element, and as the checkpoint's fingerprint sees it
        assert list(got.files) == list(built.files) and list(got.labels) == list(built.labels)
        assert got.classes == built.classes and got.fingerprint() == built.fingerprint()


def test_what_rank_0_builds_once_the_other_ranks_receive_without_building(demo_data):
    """The profilers' index too (dali-ba profile step and views): listed_once, as the training's."""
    built = []
    listed = listed_once(StandIn(0), lambda: built.append(0) or load_dataset(demo_data / "train"))
    received = listed_once(StandIn(1), lambda: built.append(1) or load_dataset(demo_data / "train"))
    assert built == [0] and received == listed and received.fingerprint() == listed.fingerprint()


def test_the_fingerprint_is_computed_once_and_never_travels(demo_data, monkeypatch):
    dataset = load_dataset(demo_data / "train")
    first = dataset.fingerprint()
    monkeypatch.setattr(PathTable, "digest_into", lambda *a: pytest.fail("hashed again"))
    assert dataset.fingerprint() == first  # cached: start-up asks more than once
    monkeypatch.undo()
    received = pickle.loads(pickle.dumps(dataset))  # as the index is broadcast
    assert "_fingerprint" not in received.__dict__ and received.fingerprint() == first  # its own, recomputed


def test_a_data_problem_on_rank_0_is_the_same_error_on_every_rank(tmp_path):
    recipe = with_data(tmp_path / "nope", tmp_path)
    with pytest.raises(UsageError, match="data directory not found") as on_rank_0:
        shared_datasets(recipe, StandIn(0))
    with pytest.raises(UsageError) as on_rank_1:
        shared_datasets(recipe, StandIn(1))
    assert str(on_rank_1.value) == str(on_rank_0.value)


# --- a trusted file list --------------------------------------------------------------------------------


def small_run(train, val, output, *extra):
    return [
        "--train", str(train), "--val", str(val), "--output", str(output), "--batch-size", "8", "--views", "2",
        "--epochs", "1", "--log-every", "1", "--deterministic", *extra,
    ]  # fmt: skip


def write_list(path: Path, files, labels) -> Path:
    path.write_text("".join(f"{f} {label}\n" for f, label in zip(files, labels)))
    return path


def test_a_missing_file_in_a_list_trains_on_named_as_broken(demo_data, tmp_path):
    demo = load_dataset(demo_data / "train")
    files, labels = list(demo.files[::15]), list(demo.labels[::15])  # 16 files of all 10 classes
    missing = str(tmp_path / "gone" / "missing.jpg")
    train = write_list(tmp_path / "train.txt", [*files[:5], missing, *files[5:]], [*labels[:5], 0, *labels[5:]])
    out = tmp_path / "run"
    done = run_cli(*TRAIN, *small_run(train, train, out), timeout=300)  # 17 samples: every one read in the epoch
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert text.count(f"skipping broken file {missing} (cannot read (No such file or directory))") == 1, text[-3000:]
    assert (out / "bad_files.txt").read_text().startswith(f"{missing}\t") and "Traceback" not in text


def test_a_malformed_list_line_is_a_one_line_error_naming_it(demo_data, tmp_path):
    demo = load_dataset(demo_data / "train")
    train = tmp_path / "train.txt"
    train.write_text(f"{demo.files[0]} 0\n# a comment\n{demo.files[1]} one\n")
    done = run_cli(*TRAIN, *small_run(train, train, tmp_path / "run"), timeout=120)
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(
        rf"python -m dali_ba\.train: error: {re.escape(str(train))}:3: expected '<path> <label>' .*\n", done.stderr
    ), done.stderr


# --- a changed data set on resume ------------------------------------------------------------------------


def test_check_same_data_skips_an_old_checkpoint_and_names_what_changed(demo_data):
    train = load_dataset(demo_data / "train")
    now = data_identity([train])
    check_same_data(None, Path("old.pt"), now)  # written before checkpoints kept it: resumes
    check_same_data(now, Path("c.pt"), now)
    fewer = data_identity([ImageDataset(train.files[1:], train.labels[1:], train.classes, train.source)])
    with pytest.raises(
        UsageError, match=f"training data {train.source} has changed .*had {len(train) - 1} samples, now {len(train)}"
    ):
        check_same_data(fewer, Path("c.pt"), now)
    relabelled = ImageDataset(train.files, [0] * len(train), train.classes, train.source)
    with pytest.raises(UsageError, match="the same .* samples, but other paths or labels.*new --output"):
        check_same_data(data_identity([relabelled]), Path("c.pt"), now)
    moved = ImageDataset(
        [p.replace(str(demo_data), "/elsewhere") for p in train.files], train.labels, train.classes, "/x"
    )
    assert data_identity([moved])["train"]["sha256"] == now["train"]["sha256"]  # the same data mounted elsewhere


def test_a_data_set_changed_before_resume_auto_is_a_one_line_error(demo_data, tmp_path):
    data = tmp_path / "data"
    for cls in ("disc_warm", "ring_cool"):
        shutil.copytree(demo_data / "train" / cls, data / cls)
    out = tmp_path / "run"
    done = run_cli(*TRAIN, *small_run(data, data, out, "--max-steps", "2"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first = sorted((data / "ring_cool").iterdir())[0]
    shutil.copy(first, data / "ring_cool" / "added.jpg")
    resumed = run_cli(*TRAIN, *small_run(data, data, out, "--max-steps", "2", "--epochs", "2", "--resume", "auto"))
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert re.fullmatch(
        rf"python -m dali_ba\.train: error: training data {re.escape(str(data))} has changed since checkpoint \S+ was "
        rf"written \(it had 48 samples, now 49\); resume with the data it was written with, or start a new run in a "
        r"new --output\n",
        resumed.stderr,
    ), resumed.stderr


# --- one listing per job, under both engines (100,000 files) ------------------------------------------------


@pytest.fixture(scope="module")
def big_list(demo_data, tmp_path_factory):
    """A 100,000-file ImageNet-like tree of hard links to 20 demo JPEGs (ext4 allows ~65,000 links a
    file), given as a file list with a 20-file validation list, all under one folder."""
    data = tmp_path_factory.mktemp("big") / "data"
    sources = [p for cls in sorted((demo_data / "train").iterdir()) for p in sorted(cls.iterdir())[:2]][:20]
    lines = []
    for c, wnid in enumerate(IMAGENET_CLASSES[:100]):
        (data / "tree" / wnid).mkdir(parents=True)
        for i in range(1000):
            name = f"tree/{wnid}/{wnid}_{10026 + i}.JPEG"
            os.link(sources[(c + i) % 20], data / name)
            lines.append(f"{name} {c}\n")
    (data / "train.txt").write_text("".join(lines))
    (data / "val.txt").write_text("".join(f"{p} {k % 10}\n" for k, p in enumerate(sources)))
    return data


STRACE = """#!/bin/sh
exec strace -f -qq -s 512 --seccomp-bpf \\
  -e trace=?stat,?lstat,?newfstatat,?fstatat64,?statx,?access,?faccessat,?faccessat2,getdents64,?open,openat \\
  -o "$TRACES/rank${OMPI_COMM_WORLD_RANK:-$RANK}" "$@"
"""


def metadata_before_first_read(trace: Path, data: Path) -> tuple[list[str], bool]:
    """The calls of a rank's trace that name the data set before its first read of a sample file, and
    whether it read one."""
    before = []
    for line in trace.read_text().splitlines():
        if str(data) not in line:
            continue
        if re.search(r'openat\(AT_FDCWD, "[^"]*\.JPEG", O_RDONLY\|O_CLOEXEC', line):
            return before, True
        before.append(line)
    return before, False


@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_one_rank_lists_a_100k_file_list_and_the_other_receives_it(big_list, tmp_path, launcher):
    out = tmp_path / "run"
    strace = launcher == "mpirun" and shutil.which("strace") is not None
    (tmp_path / "strace.sh").write_text(STRACE)  # each rank's python under its own strace (mpirun only)
    wrap, env = (["sh", str(tmp_path / "strace.sh")], {"TRACES": str(tmp_path)}) if strace else ([], {})
    command = [*MPIRUN, *wrap, *TRAIN] if launcher == "mpirun" else [*TORCHRUN, *TRAIN[1:]]  # torchrun runs -m
    flags = small_run(big_list / "train.txt", big_list / "val.txt", out, "--batch-size", "16", "--max-steps", "2")
    done = run_cli(*command, *flags, timeout=400, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (start,) = [r for r in records if r["kind"] == "start"]
    (summary,) = [r for r in records if r["kind"] == "summary"]
    assert start["engine"] == ("horovod" if launcher == "mpirun" else "torch")
    local = read_file_list(big_list / "train.txt")
    assert start["index"]["listed_by"] == 0 and start["index"]["samples"] == 100_000
    assert start["index"]["bytes_per_sample"] < 64
    per_rank = {r["rank"]: r for r in json.loads((out / "environment.json").read_text())["per_rank"]}
    assert {rank: r["index"]["role"] for rank, r in per_rank.items()} == {0: "listed", 1: "received"}
    assert {r["index"]["sha256"] for r in per_rank.values()} == {local.fingerprint()}  # the same index everywhere
    assert summary["params_identical"] and summary["steps"] == 2
    if strace:
        received, read = metadata_before_first_read(tmp_path / "rank1", big_list)
        assert read and received == [], received[:5]  # the receiving rank: nothing of the data set before its reads
        listing, read = metadata_before_first_read(tmp_path / "rank0", big_list)
        assert read and any("train.txt" in line for line in listing)  # rank 0 read the list...
        assert not any("/tree/" in line for line in listing), listing[:5]  # ...and stat'ed none of its files


@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_a_data_problem_under_two_ranks_is_one_line_and_exit_2_without_a_hang(big_list, tmp_path, launcher):
    bad = tmp_path / "bad.txt"
    bad.write_text("tree/a.JPEG 0\ntree/b.JPEG\n")
    command = [*MPIRUN, *TRAIN] if launcher == "mpirun" else [*TORCHRUN, *TRAIN[1:]]
    done = run_cli(*command, *small_run(bad, big_list / "val.txt", tmp_path / "run"), timeout=120)
    assert done.returncode == (2 if launcher == "mpirun" else 1), done.stderr[-2000:]  # torchrun: 1 for any rank's exit
    errors = [line for line in done.stderr.splitlines() if "dali_ba.train" in line and "error" in line]
    assert errors == [
        f"python -m dali_ba.train: error: {bad}:2: expected '<path> <label>' with a label >= 0, got 'tree/b.JPEG'"
    ]


# Rank 1 asks for the index 0.3 s late: long enough for rank 0 to fail its listing, exit, and so shut
# Horovod down on rank 1, which finalizes MPI there (the abort CI once saw at random, now every time).
LATE_RANK_1 = """
import runpy, sys, time
from dali_ba.distributed import horovod_engine

broadcast = horovod_engine.HorovodWorld.broadcast_object

def late(self, value):
    if self.rank:
        time.sleep(0.3)
    return broadcast(self, value)

horovod_engine.HorovodWorld.broadcast_object = late
runpy.run_module("dali_ba.train", run_name="__main__")
"""


def test_a_data_problem_found_before_rank_1_asks_still_exits_2_on_every_rank(big_list, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("tree/a.JPEG 0\ntree/b.JPEG\n")
    flags = small_run(bad, big_list / "val.txt", tmp_path / "run")
    done = run_cli(*MPIRUN, PY, "-c", LATE_RANK_1, "--recipe", "pipelines/demo.toml", *flags, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "MPI_FINALIZE" not in done.stderr and "NULL communicator" not in done.stderr, done.stderr[-3000:]
    assert "Exit code:    2" in done.stderr and "Exit code:    1" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "dali_ba.train" in line and "error" in line]
    assert errors == [
        f"python -m dali_ba.train: error: {bad}:2: expected '<path> <label>' with a label >= 0, got 'tree/b.JPEG'"
    ]
