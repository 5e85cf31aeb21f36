"""benchmarks/: the benchmark JPEGs and a small run of the side-by-side loader benchmark."""

import json
import subprocess
import sys

import pytest
from conftest import run_cli
from PIL import Image, JpegImagePlugin

from benchmarks.make_images import HEIGHT, WIDTH, write_images
from dali_ba.data.dataset import load_dataset


@pytest.fixture(scope="module")
def bench_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return root, write_images(root, 20, seed=1)


def test_images_are_imagenet_like_jpegs_in_class_folders(bench_images):
    root, written = bench_images
    dataset = load_dataset(root)
    assert len(dataset) == 20 and dataset.num_classes == 9  # one class per source photograph
    for path in written:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert WIDTH[0] <= image.width <= WIDTH[1] and HEIGHT[0] <= image.height <= HEIGHT[1]
            assert JpegImagePlugin.get_sampling(image) == 2  # 4:2:0, as most camera JPEGs
    sizes = {Image.open(path).size for path in written}
    assert len(sizes) > 10  # sizes vary, as ImageNet's do


def test_peers_times_every_method_and_reports_the_ratios(bench_images, tmp_path):
    root, _ = bench_images
    out = tmp_path / "out"
    done = run_cli(
        sys.executable,
        "-m",
        "benchmarks.peers",
        "--data",
        str(root),
        "--views",
        "1,2",
        "--epochs",
        "1",
        "--batch",
        "4",
        "--methods",
        "acfw",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "peers.json").read_text())
    rows = {(r["method"], r["views"]): r for r in record["results"]}
    assert set(rows) == {("a", 1), ("a", 2), ("c", 1), ("c", 2), ("f", 1), ("w", 1), ("w", 2)}  # f: no M
    for (_method, views), row in rows.items():
        assert row["samples"] == 20 // 4 * 4  # one timed epoch, the last partial batch dropped
        assert row["views_per_s"] == pytest.approx(row["samples_per_s"] * views)
        assert row["cpu_ms_per_view"] > 0 and row["views_per_s"] > 0
    ratios = {(r["ratio"], r["views"]): r for r in record["ratios"]}
    assert set(ratios) == {("a/c views/s", 1), ("a/c views/s", 2), ("a/f samples/s", 1)} | {
        ("a/w samples/s", m) for m in (1, 2)
    }
    assert ratios["a/w samples/s", 1]["value"] == pytest.approx(
        rows["a", 1]["samples_per_s"] / rows["w", 1]["samples_per_s"]
    )
    a2, c2 = rows["a", 2], rows["c", 2]
    assert ratios["a/c views/s", 2]["value"] == pytest.approx(a2["views_per_s"] / c2["views_per_s"])
    assert record["machine"]["cores"] >= 1 and record["data"]["files"] == 20
    assert (out / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| (a) dali-ba | 2 |" in (out / "peers.md").read_text()
    assert (
        set(record["decoded_share"]) == {"1", "2"}
        and 0 < record["decoded_share"]["1"] < record["decoded_share"]["2"] <= 1
    )


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--views", "1,0", "--views must be >= 1"),
        ("--views", "four", "--views must be comma-separated integers"),
        ("--methods", "az", "--methods must be letters from abcdefw"),
    ],
)
def test_peers_rejects_bad_flags(flag, value, message):
    done = run_cli(sys.executable, "-m", "benchmarks.peers", flag, value, "--out", "/nonexistent")
    assert done.returncode == 2 and message in done.stderr


def test_shards_benchmark_times_folder_and_shards_on_the_same_files(bench_images, tmp_path):
    root, _ = bench_images
    out = tmp_path / "out"
    done = run_cli(
        sys.executable,
        "-m",
        "benchmarks.shards",
        "--data",
        str(root),
        "--views",
        "1,2",
        "--epochs",
        "1",
        "--batch",
        "4",
        "--size",
        "64",
        "--shard-size",
        "200KB",
        "--no-cold",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "shards.json").read_text())
    assert record["files"] == 20 and record["shards"] > 1
    assert {(r["source"], r["views"], r["cache"]) for r in record["rows"]} == {
        (source, m, "warm") for source in ("folder", "shards") for m in (1, 2)
    }
    for epoch in record["epochs"]:
        assert epoch["samples"] == 20 // 4 * 4 and epoch["views_per_s"] == pytest.approx(
            epoch["samples_per_s"] * epoch["views"]
        )
    assert "| warm | 2 |" in (out / "shards.md").read_text()


def test_startup_counts_only_the_calls_that_name_the_data_set(tmp_path):
    from benchmarks.startup import trace_counts

    root = tmp_path / "data"
    trace = tmp_path / "trace"
    trace.write_text(
        f'101 newfstatat(AT_FDCWD, "{root}/c0000/a.jpg", {{st_mode=S_IFREG}}, 0) = 0\n'
        f'101 statx(AT_FDCWD, "{root}/c0001", AT_STATX_SYNC_AS_STAT, STATX_ALL, {{}}) = 0\n'
        f"101 getdents64(3<{root}/c0000>, 0x5 /* 4 entries */, 32768) = 112\n"
        f'101 openat(AT_FDCWD, "{root}/c0000/a.jpg", O_RDONLY|O_CLOEXEC) = 4<{root}/c0000/a.jpg>\n'
        f'101 newfstatat(4<{root}/c0000/a.jpg>, "", {{st_mode=S_IFREG}}, AT_EMPTY_PATH) = 0\n'
        '101 newfstatat(AT_FDCWD, "/usr/lib/python3.11/os.py", {st_mode=S_IFREG}, 0) = 0\n'
        '101 openat(AT_FDCWD, "/etc/passwd", O_RDONLY) = 5</etc/passwd>\n'
    )
    assert trace_counts(trace, root) == {"stat": 2, "getdents": 1, "open": 1, "fstat_of_open_files": 1}


def test_startup_benchmark_runs_a_small_tree(tmp_path):
    """One size, one process: the run's seconds to its first step and its RSS, the peers, and the table."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks.startup", "--sizes", "1000", "--ranks", "1", "--no-shards"]
    done = run_cli(*command, "--root", str(tmp_path / "data"), "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "startup.json").read_text())
    kinds = {(run["kind"], run["launcher"], run["ranks"]) for run in record["runs"]}
    assert kinds == {("folder", "none", 1), ("list", "none", 1)}
    for run in record["runs"]:
        assert run["first_step_s"] > 0 and run["index_s"] >= 0 and run["rss_mb"][0] > 50
    peers = record["peers"]["1000"]
    assert set(peers) == {
        "dali_index_folder",
        "dali_reader_folder",
        "torchvision_imagefolder",
        "dali_index_list",
        "dali_reader_list",
    }
    assert all(peer["seconds"] > 0 for peer in peers.values()), peers
    assert record["machine"]["cpu"] and "| folder | 1,000 | none | 1 |" in (out / "startup.md").read_text()


def test_auto_augment_benchmark_counts_the_graph_and_prices_each_m(bench_images, tmp_path):
    out = tmp_path / "out"
    done = run_cli(
        sys.executable,
        "-m",
        "benchmarks.auto_augment",
        *("--data", str(bench_images[0]), "--views", "1,2", "--batch", "8", "--size", "32", "--seconds", "0.5"),
        *("--out", str(out)),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "auto_augment.json").read_text())
    rows = {(r["augment"], r["views"]): r for r in record["results"]}
    assert set(rows) == {(a, m) for a in ("trivial", "randaugment") for m in (1, 2)}
    for augment in ("trivial", "randaugment"):  # a view per DALI sample: M > 1 adds the copy to later view slots
        assert rows[augment, 2]["operators"] > rows[augment, 1]["operators"]
        assert all(rows[augment, m]["batches"] >= 3 and rows[augment, m]["batch_cpu_s"] > 0 for m in (1, 2))
    assert record["ratios"] == []  # no M = 4 and 10 in this run
    assert "| trivial | 2 |" in (out / "auto_augment.md").read_text()
    assert record["machine"]["cores"] >= 1


def test_source_callback_benchmark_times_both_trees(demo_data, tmp_path):
    """A small run against this very commit: the earlier tree comes from a temporary git worktree."""
    out = tmp_path / "out"
    done = run_cli(
        sys.executable,
        "-m",
        "benchmarks.source_callback",
        *("--before", "HEAD", "--data", str(demo_data / "train"), "--batch-size", "16", "--views", "1,2"),
        *("--steps", "2", "--warmup", "1", "--out", str(out)),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "source_callback.json").read_text())
    assert [(r["tree"], r["views"]) for r in record["rows"]] == [
        ("before", 1),
        ("before", 2),
        ("after", 1),
        ("after", 2),
    ]
    assert all(r["source_callback_time"] > 0 and r["step_time"] > 0 for r in record["rows"])
    assert "| after |" in (out / "source_callback.md").read_text() and record["machine"]["cores"] >= 1
    worktrees = subprocess.run(["git", "worktree", "list"], capture_output=True, text=True, check=True).stdout
    assert "before" not in worktrees  # the temporary worktree is gone
