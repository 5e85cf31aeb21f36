"""dali-ba profile: the loader sweep, the data-stall step profile (1 and 2 ranks), collect."""

import json
import os
import re
import socket
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from conftest import DECODER, DEVICE, REPO, run_cli
from PIL import Image

from dali_ba.recipe import load_recipe
from dali_ba.tools import profile, step_timing
from dali_ba.training.step_clock import StepClock, StepRow

PROFILE = [sys.executable, "-m", "dali_ba", "profile"]
MPIRUN = ["mpirun", "-np", "2", *(["--allow-run-as-root"] if os.geteuid() == 0 else [])]
B, M = 30, 2  # 240 training images: 8 steps per epoch, on 1 or 2 ranks


def test_pipeline_sweep_writes_json_table_and_plot(demo_data, tmp_path):
    done = run_cli(
        *PROFILE,
        "pipeline",
        "--train",
        str(demo_data / "train"),
        "--views",
        "1,3",
        "--batch-size",
        "8",
        "--view-size",
        "24",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--out",
        str(tmp_path),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "profile_pipeline.json").read_text())
    assert (result["batch_size"], result["view_size"], result["decoder"]) == (8, 24, DECODER)
    assert [r["views"] for r in result["results"]] == [1, 3]
    for row in result["results"]:
        assert row["batch_time"] > 0
        assert row["samples_per_s"] == pytest.approx(8 / row["batch_time"])
        assert row["views_per_s"] == pytest.approx(row["views"] * row["samples_per_s"])
        assert re.search(rf"^\s+{row['views']}\s+[\d.]+\s+[\d.]+\s+{row['samples_per_s']:.1f}\s", done.stdout, re.M)
    with Image.open(tmp_path / "profile_pipeline.png") as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_pipeline_sweep_prices_each_augmentation_per_view(demo_data, tmp_path):
    done = run_cli(
        *PROFILE,
        "pipeline",
        "--train",
        str(demo_data / "train"),
        "--views",
        "2",
        "--batch-size",
        "8",
        "--view-size",
        "24",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--augment",
        "imagenet,trivial,randaugment",
        "--out",
        str(tmp_path),
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "profile_pipeline.json").read_text())
    rows = result["results"]
    assert [(r["augment"], r["views"]) for r in rows] == [("imagenet", 2), ("trivial", 2), ("randaugment", 2)]
    assert rows[0]["extra_ms_per_view"] == 0
    for row in rows:
        assert row["extra_ms_per_view"] == pytest.approx(1e3 * (row["batch_time"] - rows[0]["batch_time"]) / 16)
        extra = re.escape(f"{row['extra_ms_per_view']:+.3f}")
        assert re.search(rf"^\s+2\s.*\s{row['augment']}\s+{extra}$", done.stdout, re.M)
    assert "ms/view over imagenet" in done.stdout


def step_args(demo_data, out):
    return [
        *PROFILE,
        "step",
        "--recipe",
        "pipelines/demo.toml",
        "--train",
        str(demo_data / "train"),
        "--batch-size",
        str(B),
        "--views",
        str(M),
        "--steps",
        "3",
        "--warmup",
        "1",
        "--cache-batches",
        "2",
        "--out",
        str(out),
    ]


def on_one_and_two_ranks(root, command, timeout: int = 240) -> dict:
    """Run ``command(ranks, out)`` as one process and under mpirun -np 2, each writing to root/r<ranks>:
    {ranks: (that folder, stdout)}."""
    runs = {}
    for ranks, launch in ((1, []), (2, MPIRUN)):
        done = run_cli(*launch, *command(ranks, root / f"r{ranks}"), timeout=timeout)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        runs[ranks] = (root / f"r{ranks}", done.stdout)
    return runs


@pytest.fixture(scope="module")
def step_profiles(demo_data, tmp_path_factory):
    """Step profiles of the same setting on 1 rank and on 2 ranks (mpirun), with their stdout."""
    return on_one_and_two_ranks(tmp_path_factory.mktemp("step"), lambda ranks, out: step_args(demo_data, out))


@pytest.mark.parametrize("ranks", [1, 2])
def test_step_profile_fields(step_profiles, ranks):
    out, stdout = step_profiles[ranks]
    p = json.loads((out / "profile_step.json").read_text())
    assert (p["ranks"], p["views"], p["batch_size"], p["arch"], p["view_size"]) == (ranks, M, B, "resnet20", 32)
    assert (p["steps"], p["warmup"], p["cached_batches"], p["device"]) == (3, 1, 2, DEVICE)
    assert 0 <= p["data_stall"] <= 1 and 0 <= p["data_wait_share"] <= 1
    # 2 cached + 4 loader-alone + 1 warm-up batches come first: timed batches 7, 8, 9; batch 8 starts epoch 1
    assert (p["steps_per_epoch"], p["epoch_starts"]) == (8, 1)
    assert 0 <= p["epoch_start_wait_share"] <= p["data_wait_share"]
    fed, memory = p["loader"], p["memory"]
    assert p["data_stall_raw"] == pytest.approx((fed["step_time"] - memory["step_time"]) / fed["step_time"])
    assert p["data_wait_share"] == pytest.approx(fed["data_wait"] / fed["step_time"])
    assert 0 <= fed["data_wait"] <= fed["step_time"] <= fed["slowest_rank_step_time"]
    assert p["steps_per_s"] == pytest.approx(1 / fed["step_time"])
    assert p["images_per_s"] == pytest.approx(B * p["steps_per_s"])
    assert p["views_per_s"] == pytest.approx(M * p["images_per_s"])
    assert p["pipeline"]["samples_per_s"] == pytest.approx(B / p["pipeline"]["batch_time"])
    # host syncs are counted on CUDA only (torch's sync debug mode); one report per rank either way
    assert len(p["host_syncs"]) == ranks
    if DEVICE == "cuda":
        assert (
            p["syncs_per_step"] == max(r["max_per_step"] for r in p["host_syncs"]) and p["host_syncs"][0]["steps"] == 3
        )
    else:
        assert p["syncs_per_step"] is None and not any(r["counted"] for r in p["host_syncs"])
    # the training thread's time inside the loader's source, per batch it handed over in the loader-fed window
    assert p["source_callback_batches"] >= ranks and p["source_callback_time"] > 0
    assert stdout.count("profile step:") == 1  # rank 0 alone reports
    assert re.search(r"data stall [\d.]+% of the step", stdout)


def test_collect_merges_profiles_sorted_by_ranks(step_profiles, tmp_path):
    dirs = [str(step_profiles[2][0]), str(step_profiles[1][0])]
    done = run_cli(*PROFILE, "collect", *dirs, "--out", str(tmp_path / "summary.md"), timeout=60)
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert table[0].startswith("| nodes | ranks | M | B |") and len(table) == 4
    host = socket.gethostname()
    assert [[cell.strip() for cell in line.split("|")[1:3]] for line in table[2:]] == [[host, "1"], [host, "2"]]
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [(r["ranks"], r["views"], r["batch_size"]) for r in rows] == [(1, M, B), (2, M, B)]
    first = json.loads((step_profiles[1][0] / "profile_step.json").read_text())
    assert rows[0]["data_stall"] == first["data_stall"] and rows[0]["steps_per_s"] == first["steps_per_s"]


BAD = {
    "missing data": (["pipeline", "--train", "{tmp}/nope"], "data directory not found: .*nope"),
    "views not numbers": (["pipeline", "--views", "1,x"], "expected comma-separated integers"),
    "unknown augment": (
        ["pipeline", "--augment", "imagenet,auto"],
        "expected names among imagenet, cifar, trivial, randaugment",
    ),
    "randaugment m": (
        ["pipeline", "--augment", "randaugment", "--randaugment-m", "40"],
        r"--randaugment-m: must be <= 30, got 40",
    ),
    "steps < 1": (["pipeline", "--steps", "0"], "--steps: must be >= 1, got 0"),
    "unknown model": (["step", "--arch", "resnet9000"], "unknown model 'resnet9000'"),
    "recipe range": (["step", "--views", "0"], "--views .* must be >= 1, got 0"),
    "collect nothing": (["collect", "{tmp}", "--out", "{tmp}/s.md"], "no step profile: .*profile_step.json not found"),
    "collect garbled": (["collect", "{tmp}/bad.json", "--out", "{tmp}/s.md"], "bad.json: not a step profile"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line(tmp_path, case):
    args, message = BAD[case]
    (tmp_path / "bad.json").write_text('{"ranks": 1}')
    done = run_cli(*PROFILE, *[a.format(tmp=tmp_path) for a in args], timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("dali-ba profile") and "error:" in lines[0]
    assert re.search(message, lines[0]), lines[0]


# --- the timing loop with stand-ins: where the synchronisations are --------------------------------

DRAIN = 0.2  # seconds each stand-in synchronisation waits, as for the device's queued work
STEPS, WARMUP = 3, 2


@dataclass
class LoggedRow(StepRow):
    """A clock row that logs when it is read."""

    log: list[str] = field(default_factory=list)

    def seconds(self) -> list[float]:
        self.log.append("read")
        return super().seconds()


class CountingClock(StepClock):
    """A CPU step clock whose ``log`` says when steps begin, synchronisations happen and rows are read;
    each synchronisation waits DRAIN s, as the device's queued work would keep it waiting."""

    def __init__(self, log: list[str]):
        super().__init__(torch.device("cpu"))
        self.log = log

    def begin(self) -> None:
        self.log.append("step")
        super().begin()

    def sync(self) -> None:
        self.log.append("sync")
        time.sleep(DRAIN)

    def end(self) -> LoggedRow:
        row = super().end()
        return LoggedRow(row.marks, row.moves, self.log)


def window_log(warmup: int = WARMUP, steps: int = STEPS) -> list[str]:
    """One timed window: the warm-up's steps (no synchronisation of their own), a sync, the timed steps,
    a sync, then their rows read: 2 synchronisations per window of ``steps`` steps."""
    return ["step"] * warmup + ["sync"] + ["step"] * steps + ["sync"] + ["read"] * steps


class SoloWorld:
    """What measure_step asks of a world, for one rank and no engine."""

    engine, backend, size, local_size, rank, is_root = "none", "none", 1, 1, 0, True

    def gather(self, value):
        return [value]

    def broadcast_from_root(self, model, optimizer) -> None:
        pass

    def close(self) -> None:
        pass


class StandInLoader:
    """Batches of zeros, 8 an epoch, each a millisecond in coming: all of it in its source."""

    decoder = "stand-in"

    def __init__(self) -> None:
        self.source_seconds, self.source_batches = 0.0, 0

    def __len__(self) -> int:
        return 8

    def epoch(self, epoch: int):
        for _ in range(len(self)):
            start = time.perf_counter()
            time.sleep(0.001)
            self.source_seconds += time.perf_counter() - start
            self.source_batches += 1
            yield torch.zeros(4, 2, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)

    def source_time(self) -> tuple[float, int]:
        return self.source_seconds, self.source_batches


def stand_in_training() -> types.SimpleNamespace:
    """What measure_step asks of dali_ba.training.rank_setup.setup_training: a loader and a 2 ms step that
    marks its phases."""

    def step(images, labels, clock):
        with clock.phase("forward_backward"):
            time.sleep(0.002)
        with clock.phase("allreduce_step"):
            pass

    return types.SimpleNamespace(
        device=torch.device("cpu"),
        loader=StandInLoader(),
        torch_threads=1,
        per_rank=4,
        model=torch.nn.Linear(1, 1),
        optimizer=None,
        step=step,
    )


@pytest.fixture
def stand_ins(monkeypatch) -> list[str]:
    """measure_step on stand-ins (world, training, loader) and a counting clock; the clock's log."""
    log: list[str] = []
    monkeypatch.setattr(step_timing, "StepClock", lambda device: CountingClock(log))
    monkeypatch.setattr(
        "dali_ba.training.rank_setup.setup_training", lambda recipe, world, train_set: stand_in_training()
    )
    return log


def check_window(stats: dict, steps: int = STEPS) -> None:
    """The step time is the seconds between the two syncs / steps: the second sync's wait (the queued work of
    the timed steps) is in it, the first's (the warm-up's) is not; the rows, read afterwards, fit inside it."""
    seconds = stats["window_seconds"][0]
    assert DRAIN + sum(stats["step_times"][0]) <= seconds < 2 * DRAIN
    assert stats["step_time"] == pytest.approx(seconds / steps) and stats["steps_per_s"] == pytest.approx(
        steps / seconds
    )
    assert stats["data_wait"] == pytest.approx(sum(stats["data_waits"][0]) / steps) == stats["phases"]["data"]
    assert stats["step_time_std"] == pytest.approx(statistics.pstdev(stats["step_times"][0]))


def test_step_profile_times_its_steps_between_two_syncs(stand_ins):
    recipe = load_recipe(REPO / "pipelines" / "demo.toml")
    p = step_timing.measure_step(SoloWorld(), recipe, None, steps=STEPS, warmup=WARMUP, cache=2)
    assert stand_ins == window_log() * 3  # the loader alone, steps fed by it, steps from memory: 6 syncs, none per step
    assert (p["steps"], p["warmup"], p["timing"]) == (STEPS, WARMUP, profile.TIMING_RULE)
    for name in ("loader", "memory"):
        check_window(p[name])
        assert p[name]["phases"]["forward_backward"] >= 0.002
    assert p["loader"]["phases"]["data"] >= 0.001 and p["steps_per_s"] == p["loader"]["steps_per_s"]
    # the source's time per batch in the loader-fed window, warm-up included: each batch a 1 ms sleep
    assert p["source_callback_batches"] == WARMUP + STEPS and 0.001 <= p["source_callback_time"] < 0.1
    alone = p["pipeline"]  # the loader alone: its batches timed the same way
    assert DRAIN + sum(alone["batch_times"][0]) <= alone["window_seconds"][0] < 2 * DRAIN
    assert alone["batch_time"] == pytest.approx(alone["window_seconds"][0] / STEPS)


def test_step_profile_hands_over_each_finished_window(stand_ins):
    """A run killed at a time limit (the GPU check's) keeps what it finished: rank 0 is handed the profile
    after the loader alone and after the loader-fed steps, marked incomplete; only the end is complete."""
    partials: list[dict] = []
    recipe = load_recipe(REPO / "pipelines" / "demo.toml")
    p = step_timing.measure_step(SoloWorld(), recipe, None, STEPS, WARMUP, 2, progress=partials.append)
    assert [(q["complete"], q["windows"]) for q in partials] == [(False, ["pipeline"]), (False, ["pipeline", "loader"])]
    assert "loader" not in partials[0] and "steps_per_s" not in partials[0] and "memory" not in partials[1]
    assert partials[1]["steps_per_s"] == partials[1]["loader"]["steps_per_s"]
    assert partials[0]["pipeline"]["batch_times"] == p["pipeline"]["batch_times"]
    assert p["complete"] is True and p["windows"] == ["pipeline", "loader", "memory"] and "data_stall" in p


def wait_for_partial(process, path, ready, timeout: float = 240) -> dict:
    """Poll ``path`` while ``process`` runs until ``ready(json)``; then kill the process's whole tree, as the
    GPU check does at a step's limit, and return what was read. Fails if the process ended first."""
    from benchmarks.gpu_check.processes import kill_tree

    start = time.time()
    try:
        while time.time() - start < timeout:
            assert process.poll() is None, f"ended (rc {process.returncode}) before a partial {path.name} showed"
            try:
                seen = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                seen = None
            if seen is not None and ready(seen):
                return seen
            time.sleep(0.02)
        raise AssertionError(f"no partial {path.name} in {timeout} s")
    finally:
        kill_tree(process.pid)
        process.wait()


def test_a_step_profile_killed_after_its_first_window_leaves_it(demo_data, tmp_path):
    """A real run (the demo recipe) killed once its first window is saved: a valid JSON with that window."""
    import subprocess

    out = tmp_path / "killed"
    args = [*step_args(demo_data, out)]
    args[args.index("--steps") + 1] = "200"  # long enough windows after the first for the kill to come first
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = wait_for_partial(process, out / profile.STEP_FILE, lambda p: "pipeline" in p)
    left = json.loads((out / profile.STEP_FILE).read_text())  # after the kill: still whole JSON
    assert seen["complete"] is False and left["complete"] is False and "pipeline" in left["windows"]
    assert left["views"] == M and left["pipeline"]["samples_per_s"] > 0
    done = run_cli(*PROFILE, "collect", str(out), "--out", str(tmp_path / "table.md"))
    assert done.returncode == 2 and "incomplete step profile" in done.stderr and len(done.stderr.splitlines()) == 1


def test_host_syncs_are_counted_per_step_with_their_call_sites(monkeypatch):
    """The counter's bookkeeping, with torch's sync debug mode stood in for (it needs a CUDA driver;
    on a GPU the GPU check's profile step counts real syncs): each step's sync warnings counted where
    they were raised, other warnings passed on, the mode put back after each step."""
    from dali_ba.tools.host_syncs import SYNC_WARNING, SyncCounter

    modes = [0]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: modes.append(mode))

    def sync() -> None:
        warnings.warn(f"called a synchronizing CUDA operation ({SYNC_WARNING})", UserWarning, stacklevel=1)

    counter = SyncCounter(torch.device("cuda"))
    with counter.step():
        assert modes[-1] == "warn"
    with pytest.warns(DeprecationWarning, match="something else"), counter.step():
        sync()
        sync()
        warnings.warn("something else", DeprecationWarning, stacklevel=1)
    with counter.step():
        sync()
    assert modes[-1] == 0
    report = counter.report()
    assert report["per_step"] == [0, 2, 1] and report["total"] == 3 and report["max_per_step"] == 2
    ((site, count),) = report["sites"].items()
    assert count == 3 and site.endswith(f"test_profile.py:{sync.__code__.co_firstlineno + 1}")
    assert SyncCounter(torch.device("cpu")).report()["counted"] is False
