"""The CIFAR-10 path: conversion of the official batches, the per-view CIFAR augmentation, its
recipe, and the regime-adaptation switch."""

import json
import pickle
import sys

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from dali_ba.data.cifar10 import convert
from dali_ba.loading.augment import CIFAR_PAD, CUTOUT
from dali_ba.loading.loader import BatchAugmentLoader
from dali_ba.recipe import effective, load_recipe

NAMES = [b"cat", b"dog", b"ship"]


@pytest.fixture(scope="module")
def cifar_batches(tmp_path_factory):
    """A miniature cifar-10-batches-py: 5 training batches of 6 images and a test batch of 6."""
    src = tmp_path_factory.mktemp("cifar-10-batches-py")
    rng = np.random.default_rng(0)
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": NAMES}, f)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (6, 3 * 32 * 32), dtype=np.uint8)
        with open(src / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [i % 3 for i in range(6)]}, f)
    return src


def test_conversion_writes_class_folders_with_the_same_pixels(cifar_batches, tmp_path):
    written = convert(cifar_batches, tmp_path / "cifar10")
    assert written == {"train": 30, "test": 6}
    assert sorted(p.name for p in (tmp_path / "cifar10" / "train").iterdir()) == ["cat", "dog", "ship"]
    with open(cifar_batches / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")[b"data"][1].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cifar10" / "train" / "dog" / "00001.png")), first)


def test_conversion_names_a_missing_folder(tmp_path):
    done = run_cli(
        sys.executable, "-m", "dali_ba.data.cifar10", "--src", str(tmp_path / "nope"), "--out", str(tmp_path)
    )
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0
    assert "nope/batches.meta not found" in done.stderr


def test_cifar_views_are_shifted_flipped_and_cut_out(tmp_path):
    for i in range(8):  # flat grey images: every zero pixel is padding or the cutout hole
        Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {i}\n" for i in range(8)))
    loader = BatchAugmentLoader(tmp_path / "list.txt", 8, views=4, view_size=32, augment="cifar", num_threads=1)
    images, _ = next(iter(loader.epoch(0)))
    assert images.shape == (8, 4, 3, 32, 32)
    zero = (images == 0).all(dim=2)  # (B, M, H, W): black in every channel
    for view in zero.flatten(0, 1):
        pad_rows, pad_cols = int(view.all(1).sum()), int(view.all(0).sum())
        assert pad_rows <= CIFAR_PAD and pad_cols <= CIFAR_PAD  # at most the 4 px padding shows
        hole = int(view.sum()) - (pad_rows * 32 + pad_cols * 32 - pad_rows * pad_cols)
        assert 0 < hole <= CUTOUT * CUTOUT  # one hole, clipped at the border but never hidden
    assert len({v.numpy().tobytes() for v in zero.flatten(0, 1)}) > 16  # views differ


def test_recipe_trains_and_regime_adaptation_stretches_the_schedule(cifar_batches, tmp_path):
    data = tmp_path / "cifar10"
    convert(cifar_batches, data)
    recipe = load_recipe("pipelines/cifar10_resnet44_ba.toml")
    recipe.optim.regime = "ra"
    ra = effective(recipe)
    assert (ra.data.batch_size, ra.data.views, ra.optim.epochs, ra.optim.decay_epochs) == (256, 1, 800, [324, 488, 656])
    assert effective(load_recipe("pipelines/cifar10_resnet44_ba.toml")).data.views == 4  # ba: as written
    out = tmp_path / "run"
    done = run_cli(
        sys.executable,
        "-m",
        "dali_ba.train",
        "--recipe",
        "pipelines/cifar10_resnet44_ba.toml",
        "--train",
        str(data / "train"),
        "--val",
        str(data / "test"),
        "--output",
        str(out),
        "--batch-size",
        "4",
        "--views",
        "2",
        "--epochs",
        "1",
        "--decay-epochs",
        "",
        "--max-steps",
        "2",
        "--regime",
        "ra",
        "--dali-threads",
        "1",
        "--torch-threads",
        "1",
    )
    assert done.returncode == 0, done.stderr
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert (start["arch"], start["batch_size"], start["views"], start["epochs"], start["regime"]) == (
        "resnet44",
        8,
        1,
        2,
        "ra",
    )
    assert start["lr"] == pytest.approx(0.1 * 8 / 64)
