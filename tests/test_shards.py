"""Tar shards: written and verified, read natively by DALI, and trained on exactly as the folder they
came from (same label counts per epoch, same model, exact resume, broken samples skipped)."""

import json
import sys
import tarfile

import numpy as np
import pytest
from conftest import run_cli
from test_bad_files import BROKEN, messy  # noqa: F401 - the fixture, shared

from dali_ba import BatchAugmentLoader
from dali_ba.data.dataset import load_dataset
from dali_ba.data.shard_writer import MANIFEST, parse_size, plan_shards
from dali_ba.data.shard_writer import main as shards_main
from dali_ba.errors import UsageError
from dali_ba.training.checkpoint import list_checkpoints

TRAIN = [sys.executable, "-m", "dali_ba.train", "--recipe", "pipelines/demo.toml"]
SHARD_SIZE = 300_000  # the demo's 240 training JPEGs (~1.4 MB) in several shards


@pytest.fixture(scope="module")
def shards(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    assert shards_main([str(demo_data / "train"), str(root / "train"), "--shard-size", str(SHARD_SIZE)]) == 0
    assert (
        shards_main(
            [
                str(demo_data / "val"),
                str(root / "val"),
                "--classes",
                str(demo_data / "train"),
                "--shard-size",
                "1MB",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    return root


def test_shards_hold_every_file_once_in_order_within_the_size(demo_data, shards):
    folder, sharded = load_dataset(demo_data / "train"), load_dataset(shards / "train")
    tars = sorted((shards / "train").glob("*.tar"))
    assert len(tars) > 2 and all(tar.stat().st_size <= SHARD_SIZE for tar in tars)
    assert sorted(p.name for p in (shards / "train").iterdir()) == sorted(
        [MANIFEST] + [t.name for t in tars] + [t.with_suffix(".idx").name for t in tars]
    )  # no .partial left
    assert sharded.labels == folder.labels and sharded.classes == folder.classes and len(sharded) == len(folder)
    for i in range(len(folder)):
        assert sharded.members.read(i) == open(folder.files[i], "rb").read()
    # Every member is a plain tar member: <key>.jpg then <key>.cls holding the label.
    with tarfile.open(tars[0]) as tar:
        members = tar.getmembers()
        assert [m.name.rsplit(".", 1)[1] for m in members[:4]] == ["jpg", "cls", "jpg", "cls"]
        assert int(tar.extractfile(members[1]).read()) == folder.labels[0]


def test_dali_reads_the_shards_natively_with_their_index_files(demo_data, shards):
    from nvidia.dali import fn, pipeline_def

    tars = sorted(str(t) for t in (shards / "train").glob("*.tar"))

    @pipeline_def(batch_size=40, num_threads=1, device_id=None)
    def webdataset():
        jpeg, cls = fn.readers.webdataset(
            paths=tars,
            index_paths=[t[:-4] + ".idx" for t in tars],
            ext=["jpg", "cls"],
            missing_component_behavior="error",
        )
        return jpeg, cls

    pipe = webdataset()
    pipe.build()
    folder = load_dataset(demo_data / "train")
    encoded, labels = [], []
    for _ in range(len(folder) // 40):
        jpegs, cls = pipe.run()
        encoded += [bytes(np.asarray(jpegs[i])) for i in range(len(jpegs))]
        labels += [int(bytes(np.asarray(cls[i])).decode()) for i in range(len(cls))]
    assert labels == list(folder.labels)  # in the order written
    assert encoded == [open(path, "rb").read() for path in folder.files]


def test_an_index_less_tar_and_a_list_of_tars_load_with_labels_from_their_cls_members(shards, tmp_path):
    tars = sorted((shards / "train").glob("*.tar"))
    reference = load_dataset(shards / "train")
    for tar in tars[:2]:
        (tmp_path / tar.name).write_bytes(tar.read_bytes())  # no .idx, no manifest: scanned with tarfile
    loose = load_dataset(tmp_path)
    listed = load_dataset(",".join(str(t) for t in tars[:2]))
    n = len(loose)
    assert n == len(listed) > 0 and loose.labels == listed.labels == reference.labels[:n]
    assert [loose.members.read(i) for i in range(n)] == [reference.members.read(i) for i in range(n)]


def test_label_counts_per_epoch_and_views_equal_the_folders_on_every_rank(demo_data, shards):
    for rank in (0, 1):
        for epoch in (0, 1):
            seen = []
            for data in (demo_data / "train", shards / "train"):
                loader = BatchAugmentLoader(
                    data, 12, views=2, view_size=32, rank=rank, world_size=2, seed=3, decoder="cpu", num_threads=1
                )
                batches = [(x.clone(), y.clone()) for x, y in loader.epoch(epoch)]
                seen.append(
                    (
                        np.bincount(np.concatenate([y.numpy() for _, y in batches]), minlength=10),
                        [x for x, _ in batches],
                    )
                )
            (folder_counts, folder_views), (shard_counts, shard_views) = seen
            assert folder_counts.sum() == 12 * len(folder_views) and np.array_equal(folder_counts, shard_counts)
            assert all(np.array_equal(a, b) for a, b in zip(folder_views, shard_views))


def records(output, kind):
    return [r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def train(data_train, data_val, output, *extra):
    done = run_cli(
        *TRAIN,
        "--train",
        str(data_train),
        "--val",
        str(data_val),
        "--output",
        str(output),
        "--batch-size",
        "16",
        "--views",
        "2",
        "--epochs",
        "2",
        "--max-steps",
        "5",
        *extra,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return records(output, "summary")[0]["param_digests"]


def test_training_on_shards_gives_the_folders_model_and_resumes_exactly(demo_data, shards, tmp_path):
    on_folder = train(demo_data / "train", demo_data / "val", tmp_path / "folder")
    on_shards = train(
        shards / "train", shards / "val", tmp_path / "shards", "--checkpoint-every", "3", "--keep-checkpoints", "10"
    )
    assert on_shards == on_folder
    middle = [c for c in list_checkpoints(tmp_path / "shards") if c.stem == "step-000000003"]
    resumed = train(shards / "train", shards / "val", tmp_path / "resumed", "--resume", str(middle[0]))
    assert resumed == on_shards


def test_a_broken_sample_in_a_shard_is_skipped_and_named(messy, tmp_path):
    assert shards_main([str(messy), str(tmp_path / "shards"), "--shard-size", "100KB"]) == 0
    dataset = load_dataset(tmp_path / "shards")
    loader = BatchAugmentLoader(dataset, 8, views=2, view_size=32, decoder="cpu", num_threads=1)
    batches = sum(1 for _ in loader.epoch(0))
    assert batches == len(loader)
    named = {name.split(":", 1)[1] for name in loader.bad_files}
    assert named == {f"ring_cool/{name}" for name in BROKEN}
    check = run_cli(
        sys.executable, "-m", "dali_ba", "check-data", str(tmp_path / "shards"), "--out", str(tmp_path / "bad.txt")
    )
    assert check.returncode == 1, check.stderr
    assert {line.split("\t")[0] for line in (tmp_path / "bad.txt").read_text().splitlines()} == set(loader.bad_files)


def test_bad_input_is_a_one_line_error(demo_data, shards, tmp_path, capsys):
    assert parse_size("1GB") == 10**9 and parse_size("512MiB") == 2**29 and parse_size("4096") == 4096
    for text in ("big", "1XB", "0", "-1GB"):
        with pytest.raises(UsageError, match="--shard-size"):
            parse_size(text)
    assert [list(r) for r in plan_shards([100, 9000, 100, 100], 10240)] == [[0], [1], [2, 3]]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cut = tmp_path / "cut"
    cut.mkdir()
    first = sorted((shards / "train").glob("*.tar"))[0]
    (cut / first.name).write_bytes(first.read_bytes()[:50_000])
    (cut / first.with_suffix(".idx").name).write_bytes(first.with_suffix(".idx").read_bytes())
    cases = {
        (str(demo_data / "train"), str(tmp_path / "full")): "exists and is not an empty folder",
        (str(demo_data / "train"), str(tmp_path / "o1"), "--shard-size", "lots"): "--shard-size",
        (str(shards / "train"), str(tmp_path / "o2")): "is already shards",
        (str(tmp_path / "nothing"), str(tmp_path / "o3")): "not found",
    }
    for argv, message in cases.items():
        assert shards_main(list(argv)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    with pytest.raises(UsageError, match="is truncated"):
        load_dataset(cut)
    done = run_cli(*TRAIN, "--train", str(cut), "--val", str(shards / "val"), "--output", str(tmp_path / "run"))
    assert done.returncode == 2 and "is truncated" in done.stderr and "Traceback" not in done.stderr


def test_shards_of_some_classes_are_labelled_by_the_training_classes(demo_data, tmp_path):
    train = load_dataset(demo_data / "train")
    for name in train.classes[3:5]:  # two of the ten classes: labels 0 and 1 in their own shards
        (tmp_path / "part" / name).mkdir(parents=True)
        for path in sorted((demo_data / "val" / name).iterdir()):
            (tmp_path / "part" / name / path.name).write_bytes(path.read_bytes())
    assert shards_main([str(tmp_path / "part"), str(tmp_path / "shards"), "--workers", "1"]) == 0
    own = load_dataset(tmp_path / "shards")
    relabelled = load_dataset(tmp_path / "shards", classes=train.classes)
    assert set(own.labels) == {0, 1} and relabelled.labels == tuple(label + 3 for label in own.labels)
    assert relabelled.classes == train.classes
    with pytest.raises(UsageError, match="is not one of the 2 training classes"):
        load_dataset(tmp_path / "shards", classes=("x", "y"))
