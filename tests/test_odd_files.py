"""Odd but valid image files train: CMYK and grayscale JPEGs, PNG content named .jpg, EXIF rotation,
progressive JPEGs, a 16-pixel and a 10000-pixel image all become 3-channel views."""

import io
import sys

import pytest
import torch
from conftest import run_cli
from PIL import Image
from test_check_data import jpeg_bytes, photo

from dali_ba import BatchAugmentLoader

pytestmark = pytest.mark.strict_device  # GPU-relevant: make test's strict-device pass and the GPU check run it

ODD = {
    "cmyk": lambda: jpeg_bytes(photo().convert("CMYK")),
    "grey": lambda: jpeg_bytes(photo().convert("L")),
    "png_named": lambda: _png(photo()),
    "exif_rotated": lambda: jpeg_bytes(photo(), exif=_orientation(6)),
    "progressive": lambda: jpeg_bytes(photo(), progressive=True),
    "tiny16": lambda: jpeg_bytes(photo(16, 16)),
    "wide10000": lambda: jpeg_bytes(photo(10000, 1200)),
}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    for label, names in (("odd", list(ODD)), ("plain", [f"plain{i}" for i in range(7)])):
        (root / label).mkdir()
        for i, name in enumerate(names):
            data = ODD[name]() if name in ODD else jpeg_bytes(photo(seed=i))
            (root / label / f"{name}.jpg").write_bytes(data)
    return root


def test_every_odd_file_becomes_three_channel_views(odd_folder):
    loader = BatchAugmentLoader(odd_folder, batch_size=7, views=2, view_size=32, num_threads=1, seed=1)
    seen = 0
    for images, labels in loader.epoch(0):
        assert images.shape == (7, 2, 3, 32, 32) and images.dtype == torch.uint8
        spread = images.float().flatten(2).std(dim=2)  # per view: a picture, not a blank
        assert (spread > 1).all(), spread
        seen += len(labels)
    assert seen == 14


def test_a_run_trains_on_odd_files(odd_folder, tmp_path):
    done = run_cli(
        sys.executable,
        "-m",
        "dali_ba.train",
        "--recipe",
        "pipelines/demo.toml",
        "--train",
        str(odd_folder),
        "--val",
        str(odd_folder),
        "--output",
        str(tmp_path / "run"),
        "--batch-size",
        "7",
        "--epochs",
        "2",
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "val top-1" in done.stdout
