"""dali-ba check-data: every file decoded once, the bad ones listed with a reason, a clean list."""

import io
import sys

import numpy as np
import pytest
from conftest import identity_image, run_cli
from PIL import Image

from dali_ba.data.dataset import read_file_list
from dali_ba.loading.probe import check_files

CHECK = [sys.executable, "-m", "dali_ba", "check-data"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def photo(width=120, height=90, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = (x * [1, 0.3, 0.6] + y * [0.2, 1, 0.4]) / 2 + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def broken_middle(data: bytes) -> bytes:
    """Keep the header and the end marker, zero a third of the compressed data in between."""
    start, end = len(data) // 3, 2 * len(data) // 3
    return data[:start] + b"\0" * (end - start) + data[end:]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Class folders holding good, odd-but-valid and broken files; returns (root, {name: broken?})."""
    root = tmp_path_factory.mktemp("check")
    good, bad = root / "good", root / "bad"
    good.mkdir()
    bad.mkdir()
    base = photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    png = io.BytesIO()
    base.save(png, "PNG")
    files = {
        good / f"plain{i}.jpg": jpeg_bytes(photo(seed=i))
        for i in range(70)  # enough to use the process pool
    }
    files.update(
        {
            good / "cmyk.jpg": jpeg_bytes(base.convert("CMYK")),
            good / "grey.jpg": jpeg_bytes(base.convert("L")),
            good / "png_named.jpg": png.getvalue(),
            good / "exif_rotated.jpg": jpeg_bytes(base, exif=exif.tobytes()),
            good / "progressive.jpg": jpeg_bytes(base, progressive=True),
            good / "tiny16.jpg": jpeg_bytes(photo(16, 16)),
            bad / "empty.jpg": b"",
            bad / "truncated.jpg": jpeg_bytes(base)[:700],
            bad / "text.jpg": b"this is not an image\n" * 20,
            bad / "truncated.png": png.getvalue()[:300],
        }
    )
    for path, data in files.items():
        path.write_bytes(data)
    (root / "middle_zeroed.jpg").write_bytes(broken_middle(jpeg_bytes(base)))  # not in a class folder: unit test
    return root, {str(p): p.parent == bad for p in files}


def test_full_decode_names_every_broken_file_and_writes_a_clean_list(folder, tmp_path):
    root, broken = folder
    out, fixed = tmp_path / "bad.txt", tmp_path / "good.txt"
    done = run_cli(*CHECK, str(root), "--out", str(out), "--fix-list", str(fixed), "--workers", "2", timeout=120)
    assert done.returncode == 1, done.stderr
    listed = dict(line.split("\t") for line in out.read_text().splitlines())
    assert set(listed) == {path for path, is_bad in broken.items() if is_bad}
    assert all(reason.strip() for reason in listed.values())
    clean = read_file_list(fixed)
    assert set(clean.files) == {path for path, is_bad in broken.items() if not is_bad}
    assert f"checked {len(broken)} files (full decode)" in done.stdout and "4 bad" in done.stdout
    assert "per core" in done.stdout


def test_two_ranks_split_the_files_and_agree(folder, tmp_path):
    root, broken = folder
    out = tmp_path / "bad.txt"
    done = run_cli(
        *TORCHRUN, "-m", "dali_ba", "check-data", str(root), "--out", str(out), "--workers", "1", timeout=180
    )
    assert done.returncode != 0  # bad files found (torchrun reports rank 0's exit 1)
    listed = {line.split("\t")[0] for line in out.read_text().splitlines()}
    assert listed == {path for path, is_bad in broken.items() if is_bad}
    assert "on 2 rank(s)" in done.stdout


def bad_huffman_table(data: bytes) -> bytes:
    """Markers and header intact, the first Huffman table's code counts overwritten."""
    data = bytearray(data)
    table = data.index(b"\xff\xc4")
    data[table + 5 : table + 21] = b"\xff" * 16
    return bytes(data)


def dali_decodes(path) -> bool:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        jpegs, _ = fn.readers.file(files=[str(path)])
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    try:
        pipe.run()
    except RuntimeError:
        return False
    return True


def test_quick_check_finds_cut_and_foreign_files_but_not_inner_damage(folder, tmp_path):
    root, broken = folder
    quick = check_files(list(broken), workers=1, quick=True)
    assert set(quick) == {path for path, is_bad in broken.items() if is_bad}
    # A damaged Huffman table behind intact markers: DALI fails on it; only the full decode finds it.
    huffman = tmp_path / "bad_huffman.jpg"
    huffman.write_bytes(bad_huffman_table(jpeg_bytes(photo())))
    assert not dali_decodes(huffman)
    assert check_files([str(huffman)], 1, quick=True) == {} and str(huffman) in check_files([str(huffman)], 1)
    # Zeroed entropy data: libjpeg warns and decodes it (grey blocks), in Pillow and in DALI alike, so it
    # never stops a run, and neither check reports it.
    inner = root / "middle_zeroed.jpg"
    assert dali_decodes(inner)
    assert check_files([str(inner)], 1) == {} and check_files([str(inner)], 1, quick=True) == {}


def test_clean_data_exits_zero(demo_data, tmp_path):
    done = run_cli(*CHECK, str(demo_data / "val"), "--out", str(tmp_path / "bad.txt"), timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bad.txt").read_text() == "" and "0 bad" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent"], "data directory not found: /nonexistent"),
        (["DEMO", "--out", "/nonexistent/bad.txt"], "cannot write /nonexistent/bad.txt: its folder does not exist"),
        (["DEMO", "--workers", "-1"], "--workers must be >= 0, got -1"),
    ],
)
def test_check_data_bad_input_is_one_line(demo_data, args, message):
    done = run_cli(*CHECK, *[str(demo_data / "val") if a == "DEMO" else a for a in args], timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == f"dali-ba check-data: error: {message}"


def test_a_giant_image_is_bad_by_its_header(tmp_path):
    """An image whose header says more than --max-image-pixels is listed without being decoded, as
    the loaders skip it; the recipe's default is the reader's (Pillow's limit)."""
    from PIL import Image

    from dali_ba.loading.reader import DEFAULT_MAX_IMAGE_PIXELS
    from dali_ba.recipe import DataConfig

    assert DataConfig.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        identity_image(1).save(tmp_path / "data" / cls / "small.jpg")
    Image.new("L", (12000, 9000), 128).save(tmp_path / "data" / "b" / "large.jpg", quality=50)  # 108 M pixels
    for limit, listed in ((None, True), ("100000000", True), ("200000000", False)):
        out = tmp_path / f"bad-{limit}.txt"
        done = run_cli(
            *CHECK,
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--quick",
            *(["--max-image-pixels", limit] if limit else []),
        )
        assert done.returncode == (1 if listed else 0), done.stderr
        text = out.read_text()
        assert ("large.jpg\t12000x9000 pixels, more than --max-image-pixels" in text) == listed, text
