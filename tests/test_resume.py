"""Checkpoints and resume: exact continuation, damaged files, and stopping on SLURM's signals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_cli

from dali_ba import __version__
from dali_ba.training.checkpoint import list_checkpoints, load_checkpoint
from dali_ba.training.preemption import EXIT_RESUMABLE

pytestmark = pytest.mark.strict_device  # GPU-relevant: make test's strict-device pass and the GPU check run it

PY = sys.executable
TRAIN = [PY, "-m", "dali_ba.train", "--recipe", "pipelines/demo.toml"]
MPIRUN = ["mpirun", "-np", "2", *(["--allow-run-as-root"] if os.geteuid() == 0 else [])]


def args(demo_data, output, *extra):
    return [
        "--train",
        str(demo_data / "train"),
        "--val",
        str(demo_data / "val"),
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
        "--log-every",
        "1",
        "--deterministic",
        *extra,
    ]


def records(output, kind=None):
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


def digest(output):
    (summary,) = records(output, "summary")
    return summary["param_digests"]


@pytest.fixture(scope="module")
def uninterrupted(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = run_cli(*TRAIN, *args(demo_data, out, "--checkpoint-every", "3", "--keep-checkpoints", "10"))
    assert done.returncode == 0, done.stderr
    return out


def test_checkpoints_every_n_steps_and_at_epoch_ends(uninterrupted):
    names = [p.name for p in list_checkpoints(uninterrupted)]
    assert names == [f"step-{s:09d}.pt" for s in (10, 9, 6, 5, 3)]  # 3, 6, 9 mid-epoch; 5, 10 epoch ends
    state = load_checkpoint(uninterrupted / "checkpoints" / "step-000000003.pt")
    assert (state["step"], state["epoch"], state["loaders"][0]["batches"]) == (3, 0, 3)
    assert load_checkpoint(uninterrupted / "checkpoints" / "step-000000005.pt")["loaders"] is None


def test_resume_mid_epoch_reaches_the_same_parameters(demo_data, uninterrupted, tmp_path):
    out = tmp_path / "resumed"
    done = run_cli(*TRAIN, *args(demo_data, out, "--resume", str(uninterrupted / "checkpoints" / "step-000000003.pt")))
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    assert [r["step"] for r in records(out, "step")] == list(range(4, 11))
    assert records(out, "start")[0]["resumed_from"] == 3
    assert [r["step"] for r in records(out, "startup")] == [4]  # its start-up ends with its first step
    assert digest(out) == digest(uninterrupted)
    assert records(out, "epoch")[-1]["train_loss"] == records(uninterrupted, "epoch")[-1]["train_loss"]


def test_resume_auto_skips_a_damaged_checkpoint_and_keeps_the_newest_k(demo_data, tmp_path):
    out = tmp_path / "run"
    first = run_cli(
        *TRAIN, *args(demo_data, out, "--epochs", "1", "--checkpoint-every", "2", "--keep-checkpoints", "2")
    )
    assert first.returncode == 0, first.stderr
    assert [p.name for p in list_checkpoints(out)] == ["step-000000005.pt", "step-000000004.pt"]
    newest = list_checkpoints(out)[0]
    newest.write_bytes(newest.read_bytes()[:1000])  # a write cut short by a crash
    again = run_cli(*TRAIN, *args(demo_data, out, "--resume", "auto"))
    assert again.returncode == 0, again.stderr
    assert "skipping damaged checkpoint" in again.stderr and "step-000000005.pt" in again.stderr
    assert records(out, "start")[-1]["resumed_from"] == 4
    assert [r["step"] for r in records(out, "startup")] == [1, 5]  # one per run, after its first step
    assert [r["step"] for r in records(out, "step")][-6:] == list(range(5, 11))


def test_resume_rejects_a_checkpoint_of_another_run(demo_data, uninterrupted, tmp_path):
    out = tmp_path / "other"
    done = run_cli(
        *TRAIN,
        *args(demo_data, out, "--views", "3", "--resume", str(uninterrupted / "checkpoints" / "step-000000003.pt")),
    )
    assert done.returncode == 2
    assert "was written with views = 2, this run has 3" in done.stderr and "Traceback" not in done.stderr


def test_resume_rejects_a_checkpoint_of_another_dali_ba_version(demo_data, uninterrupted, tmp_path):
    state = torch.load(uninterrupted / "checkpoints" / "step-000000003.pt", weights_only=True)
    assert state["version"] == __version__
    old = tmp_path / "old.pt"
    torch.save({**state, "version": "0.1.0"}, old)
    done = run_cli(*TRAIN, *args(demo_data, tmp_path / "run", "--resume", str(old)))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"was written by dali-ba 0.1.0, this is dali-ba {__version__}" in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_checkpoints_load_without_unpickling_code(uninterrupted):
    path = uninterrupted / "checkpoints" / "step-000000006.pt"
    state = torch.load(path, weights_only=True)
    assert state["loaders"][0] == {"epoch": 1, "batches": 1} and state["run"]["ranks"] == 1  # no RNG state needed


def test_a_signal_to_one_rank_stops_both_after_a_checkpoint_and_resume_finishes_the_run(demo_data, tmp_path):
    reference = tmp_path / "reference"
    done = run_cli(*MPIRUN, *TRAIN, *args(demo_data, reference))
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "run"
    env = {**os.environ, "PATH": f"{os.path.dirname(PY)}:{os.environ['PATH']}", "OMPI_MCA_mpi_yield_when_idle": "1"}
    job = subprocess.Popen(
        [*MPIRUN, *TRAIN, *args(demo_data, out)],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and records(out, "step")):
        time.sleep(0.2)
    rank1 = json.loads((out / "environment.json").read_text())["per_rank"][1]["pid"]
    os.kill(rank1, signal.SIGUSR1)  # only rank 1 hears it; both must stop after the same step
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == EXIT_RESUMABLE, stderr[-2000:]
    (stop,) = records(out, "stop")
    assert stop["signal"] == "SIGUSR1" and stop["signalled_ranks"] == [1] and stop["step"] < 10
    assert "run again with --resume auto" in stderr
    state = load_checkpoint(list_checkpoints(out)[0])
    assert state["step"] == stop["step"] and len({s["epoch"] for s in state["loaders"] or [{"epoch": 0}]}) == 1
    resumed = run_cli(*MPIRUN, *TRAIN, *args(demo_data, out, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert records(out, "start")[-1]["resumed_from"] == stop["step"]
    assert sorted({r["step"] for r in records(out, "step")}) == list(range(1, 11))
    assert digest(out) == digest(reference)
