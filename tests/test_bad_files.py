"""A broken image never ends a run: it is named, listed, refilled in training and left out of
evaluation; a resumed run skips it the same way; a folder of garbage is a one-line error."""

import json
import sys

import numpy as np
import pytest
from conftest import decode_identity, identity_image, run_cli
from test_check_data import jpeg_bytes, photo
from test_odd_files import ODD

from dali_ba import BatchAugmentLoader, ValidationLoader
from dali_ba.training.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.strict_device  # GPU-relevant: make test's strict-device pass and the GPU check run it

TRAIN = [sys.executable, "-m", "dali_ba.train", "--recipe", "pipelines/demo.toml"]
HOROVODRUN = ["horovodrun", "-np", "2"]
BROKEN = {
    "truncated.jpg": lambda: jpeg_bytes(photo())[:600],
    "empty.jpg": lambda: b"",
    "text.jpg": lambda: b"not an image at all\n" * 30,
}


def records(output, kind):
    return [r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def messy(demo_data, tmp_path_factory):
    """Two demo classes with broken files among them, and valid odd ones (PNG-named, CMYK)."""
    root = tmp_path_factory.mktemp("messy")
    for cls in ("disc_warm", "ring_cool"):
        (root / cls).mkdir()
        for src in sorted((demo_data / "train" / cls).iterdir())[:14]:
            (root / cls / src.name).write_bytes(src.read_bytes())
    for name, make in BROKEN.items():
        (root / "ring_cool" / name).write_bytes(make())
    for name in ("png_named", "cmyk"):
        (root / "disc_warm" / f"{name}.jpg").write_bytes(ODD[name]())
    return root


def run_args(messy, output, *extra):
    return [
        "--train",
        str(messy),
        "--val",
        str(messy),
        "--output",
        str(output),
        "--batch-size",
        "8",
        "--views",
        "2",
        "--epochs",
        "2",
        "--log-every",
        "1",
        "--deterministic",
        *extra,
    ]


@pytest.mark.parametrize("launcher", [None, "horovodrun"])
def test_a_run_on_a_folder_with_broken_files_finishes_and_names_them(messy, tmp_path, launcher):
    out = tmp_path / "run"
    done = run_cli(*(HOROVODRUN if launcher else []), *TRAIN, *run_args(messy, out), timeout=300)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    broken = {str(messy / "ring_cool" / name) for name in BROKEN}
    for path in broken:  # named once, with the rank that found it and the reason
        assert text.count(f"skipping broken file {path} (") == 1, text[-3000:]
    assert "Traceback" not in text
    listed = dict(line.split("\t") for line in (out / "bad_files.txt").read_text().splitlines())
    assert set(listed) == broken and all(listed.values())
    epochs = records(out, "epoch")
    assert [e["bad_files"] for e in epochs] == [3, 3]
    assert epochs[-1]["val_samples"] == 28 + 2  # every good file once, broken ones left out
    (summary,) = records(out, "summary")
    assert summary["params_identical"] and summary["bad_files"] == 3
    assert summary["steps"] == 2 * len(
        BatchAugmentLoader(messy, 8 // (2 if launcher else 1), views=2, world_size=2 if launcher else 1)
    )


@pytest.mark.parametrize("stage, augment", [("torch", "imagenet"), ("dali", "imagenet"), ("dali", "trivial")])
def test_every_loader_skips_broken_files_on_either_view_stage(messy, stage, augment):
    """The GPU path's graph ("dali": on DALI's CPU operators here) reads each sample's size from its
    header for the view parameters: an empty or non-image file is a broken file there too, named once;
    so too on its auto-augment graph, whose batch is B samples' M view slots each."""
    from dali_ba import AugmentedValidationLoader

    broken = {str(messy / "ring_cool" / name) for name in BROKEN}
    args = dict(batch_size=8, views=2, view_size=24, num_threads=1, stage=stage, augment=augment)
    train = BatchAugmentLoader(messy, **args)
    views = AugmentedValidationLoader(messy, **args)
    named = []
    for loader in (train, views):
        loader.on_bad_file = lambda path, reason: named.append(path)
    for epoch in (0, 1):
        assert sum(1 for _ in train.epoch(epoch)) == len(train)
    assert set(train.bad_files) == broken and sorted(named) == sorted(broken)
    named.clear()
    seen = sum(len(labels) for _, labels in views)
    assert set(views.bad_files) == broken and sorted(named) == sorted(broken)
    assert seen == 30  # every good file once, broken ones left out


def test_a_run_on_the_dali_graph_with_broken_files_finishes_with_eval_views_and_calibration(messy, tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        *TRAIN, *run_args(messy, out, "--view-stage", "dali", "--eval-views", "2", "--calibrate-bn", "2"), timeout=300
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert "Traceback" not in text
    for name in BROKEN:
        assert text.count(f"skipping broken file {messy / 'ring_cool' / name} (") == 1, text[-3000:]
    (epoch, _) = records(out, "epoch")[-1:] * 2
    assert epoch["bad_files"] == 3 and epoch["val_samples"] == 30
    assert "views_top1" in epoch and "calibrated_top1" in epoch


def test_resume_across_a_skipped_file_is_exact(messy, tmp_path):
    reference = tmp_path / "reference"
    done = run_cli(*TRAIN, *run_args(messy, reference, "--checkpoint-every", "1", "--keep-checkpoints", "20"))
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoints = sorted(list_checkpoints(reference))
    known = {path: load_checkpoint(path)["bad_files"] for path in checkpoints}
    # mid-epoch, every broken file known (the reader finds each one as it reads it, not all at once)
    after = [path for path in checkpoints if len(known[path]) == len(BROKEN) and load_checkpoint(path)["loaders"]]
    assert after, "no mid-epoch checkpoint after the broken files were found"
    # From the first checkpoint and from a mid-epoch one that already lists the broken files (the
    # resumed run refills them from the checkpoint, without meeting them again): both end where the
    # uninterrupted run ended.
    for checkpoint in dict.fromkeys((checkpoints[0], after[len(after) // 2])):
        out = tmp_path / checkpoint.stem
        again = run_cli(*TRAIN, *run_args(messy, out, "--resume", str(checkpoint)))
        assert again.returncode == 0, again.stderr[-2000:]
        assert records(out, "summary")[0]["param_digests"] == records(reference, "summary")[0]["param_digests"]
        assert (out / "bad_files.txt").read_text() == (reference / "bad_files.txt").read_text()
        for path, _ in known[checkpoint]:  # what the checkpoint knew is refilled, never met again
            assert f"skipping broken file {path} " not in again.stderr
        if len(known[checkpoint]) == len(BROKEN):
            assert "skipping broken file" not in again.stderr


def test_a_folder_of_garbage_is_a_one_line_error(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "data" / cls / f"{i}.jpg").write_bytes(b"garbage" * i)
    out = tmp_path / "run"
    done = run_cli(
        *TRAIN,
        "--train",
        str(tmp_path / "data"),
        "--val",
        str(tmp_path / "data"),
        "--output",
        str(out),
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--max-bad-files",
        "3",
        timeout=120,
    )
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert "broken files found, more than --max-bad-files 3" in errors[0] and "dali-ba check-data" in errors[0]
    assert "Traceback" not in done.stderr


def test_a_broken_slot_is_refilled_from_its_batch_and_left_out_of_evaluation(tmp_path):
    for i in range(12):
        identity_image(i).save(tmp_path / f"img{i:02d}.jpg", quality=95, subsampling=0)
    (tmp_path / "img05.jpg").write_bytes(b"")
    (tmp_path / "list.txt").write_text("".join(f"img{i:02d}.jpg {i}\n" for i in range(12)))
    loader = BatchAugmentLoader(tmp_path / "list.txt", batch_size=4, views=3, view_size=24, num_threads=1, seed=2)
    found = []
    loader.on_bad_file = lambda path, reason: found.append(path)
    order = loader.shard(0)
    for position, (images, labels) in enumerate(loader.epoch(0)):
        indices = order[position * 4 : position * 4 + 4]
        assert images.shape == (4, 3, 3, 24, 24)  # B samples still
        ids = decode_identity(images)
        assert (ids == labels.cpu().numpy()[:, None]).all()  # every slot shows the sample its label names
        if 5 in indices:
            slot = list(indices).index(5)
            label = int(labels[slot])
            assert label != 5 and label in indices  # refilled from its own batch
            others = [s for s in range(4) if indices[s] == label]
            assert not np.array_equal(
                images[slot].cpu().numpy(), images[others[0]].cpu().numpy()
            )  # under its own views
    assert found == [str(tmp_path / "img05.jpg")]
    val = ValidationLoader(tmp_path / "list.txt", batch_size=4, resize=28, crop=24, num_threads=1)
    val.bad_files = loader.bad_files
    assert sorted(y for _, labels in val for y in labels.tolist()) == [i for i in range(12) if i != 5]


@pytest.fixture(scope="module")
def giant(tmp_path_factory):
    """The demo's two classes with a real 20000 x 20000 JPEG among them (4.7 MB on disk, 1.2 GB decoded as RGB)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("giant")
    for cls, count in (("disc_warm", 10), ("ring_cool", 10)):
        (root / cls).mkdir()
        for k in range(count):
            identity_image(k).save(root / cls / f"{k}.jpg", quality=90)
    Image.new("L", (20000, 20000), 128).save(root / "ring_cool" / "giant.jpg", quality=50)
    return root


def test_a_giant_image_is_skipped_without_being_decoded(giant, tmp_path):
    """Its header says 400 M pixels, over --max-image-pixels (Pillow's 89.5 M by default): a broken
    file on either view stage, named and counted, never decoded."""
    import os
    import subprocess

    from conftest import REPO

    out = tmp_path / "run"
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    for stage in ("torch", "dali"):
        job = subprocess.Popen(
            [
                *TRAIN,
                "--train",
                str(giant),
                "--val",
                str(giant),
                "--output",
                str(out / stage),
                "--batch-size",
                "4",
                "--views",
                "2",
                "--epochs",
                "1",
                "--view-stage",
                stage,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stdout, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr[-2000:]
        name = giant / "ring_cool" / "giant.jpg"
        assert (
            stderr.count(
                f"skipping broken file {name} (400000000 pixels, more than --max-image-pixels 89478485: not decoded)"
            )
            == 1
        )
        assert records(out / stage, "epoch")[0]["bad_files"] == 1 and "Traceback" not in stderr


def test_a_giant_image_costs_no_memory(giant, tmp_path):
    """The peak resident memory of a run over the giant image stays about that of the same run
    without it (torch, DALI and the model take ~1 GB here): decoding it would add 1.2 GB."""
    import os
    import shutil
    import subprocess

    from conftest import REPO

    without = tmp_path / "without"
    shutil.copytree(giant, without, ignore=shutil.ignore_patterns("giant.jpg"))
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    peak = {}
    for data in (giant, without):
        job = subprocess.Popen(
            [
                *TRAIN,
                "--train",
                str(data),
                "--val",
                str(data),
                "--output",
                str(tmp_path / data.name),
                "--batch-size",
                "4",
                "--views",
                "2",
                "--epochs",
                "1",
                "--view-stage",
                "dali",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(job.pid, 0)  # this child's own resource usage
        assert os.waitstatus_to_exitcode(status) == 0
        peak[data] = usage.ru_maxrss * 1024
    decoded = 20000 * 20000 * 3
    assert peak[giant] - peak[without] < decoded / 3, {k.name: v >> 20 for k, v in peak.items()}
