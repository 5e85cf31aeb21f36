"""A full output file system: writes end with one clear error, nothing half-written stays; and the
divergence rule over the logged losses."""

import errno
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli, tail

from dali_ba.errors import DivergedError
from dali_ba.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from dali_ba.training.output import OutputFullError, is_out_of_space, writing
from dali_ba.training.records import MetricsLog
from dali_ba.training.step_times import first_divergence


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root may mount one): a real file system that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"cannot mount a tmpfs (tests run as root): {done.stderr}"
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_what_counts_as_out_of_space():
    assert is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_out_of_space(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2944 vs 2840"))
    assert not is_out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert not is_out_of_space(RuntimeError("CUDA error"))


def test_a_checkpoint_on_a_full_disk_is_one_error_and_leaves_no_temporary_file(small_disk):
    save_checkpoint(small_disk, 1, {"weights": torch.zeros(32 << 10)}, keep=5)  # 128 KiB: fits
    with pytest.raises(OutputFullError) as caught:
        save_checkpoint(small_disk, 2, {"weights": torch.zeros(512 << 10)}, keep=5)  # 2 MiB: does not
    message = str(caught.value)
    assert "\n" not in message and "step-000000002.pt" in message and "MiB free of 1.0 MiB" in message
    assert f"the last good checkpoint is {small_disk / 'checkpoints' / 'step-000000001.pt'}" in message
    assert "--resume auto" in message
    assert sorted(p.name for p in (small_disk / "checkpoints").iterdir()) == ["step-000000001.pt"]
    assert torch.equal(load_checkpoint(list_checkpoints(small_disk)[0])["weights"], torch.zeros(32 << 10))


def test_metrics_on_a_full_disk_is_one_error_and_a_resumed_log_drops_the_cut_record(small_disk):
    log = MetricsLog(small_disk / "metrics.jsonl")
    log.write("start", step=0)
    with pytest.raises(OutputFullError, match="no space left to write .*metrics.jsonl .*none yet"):
        for step in range(100_000):
            log.write("step", step=step, padding="x" * 1000)
    text = (small_disk / "metrics.jsonl").read_bytes()
    (small_disk / "metrics.jsonl").write_bytes(text[:1000] + text[1000:].split(b"\n", 1)[0][:10])  # a cut record
    MetricsLog(small_disk / "metrics.jsonl", append=True).close()
    assert (small_disk / "metrics.jsonl").read_bytes().endswith(b"\n")


def test_other_write_errors_pass_through_and_the_partial_file_goes(tmp_path):
    partial = tmp_path / ".x.tmp"
    partial.write_text("half")
    with pytest.raises(PermissionError):
        with writing(tmp_path / "x", tmp_path, partial=partial):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert not partial.exists()


def test_the_first_diverged_step_is_the_one_reported():
    meta = [{"step": s, "lr": 0.1} for s in (1, 2, 3, 4)]
    assert first_divergence(np.array([2.3, 2.2, 2.1, 2.0]), meta, 1000.0) is None
    assert first_divergence(np.array([2.3, 5e3, math.nan, 2.0]), meta, 1000.0) == {"step": 2, "lr": 0.1, "loss": 5e3}
    assert first_divergence(np.array([2.3, 5e3, math.inf, 2.0]), meta, 0) == {"step": 3, "lr": 0.1, "loss": math.inf}


TRAIN = [sys.executable, "-m", "dali_ba.train", "--recipe", "pipelines/demo.toml"]
MPIRUN = ["mpirun", "-np", "2", *(["--allow-run-as-root"] if os.geteuid() == 0 else []), "--bind-to", "none"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run_args(demo_data, output, *extra):
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
        "--view-size",
        "24",
        "--epochs",
        "2",
        *extra,
    ]


def records(output, kind):
    return [r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.parametrize("launcher", [[], MPIRUN, TORCHRUN], ids=["one-process", "mpirun-2-ranks", "torchrun-2-ranks"])
def test_a_diverging_loss_stops_the_run_at_that_step(demo_data, tmp_path, launcher):
    """--lr 50: the first step whose loss is over --max-loss ends the run with one line (step, loss,
    lr, last good checkpoint), exit 4, on every rank (under torchrun, each rank's code as torchrun
    reports it: no rank aborts on its way out); no checkpoint of that step or later exists."""
    out = tmp_path / "run"
    done = run_cli(
        *launcher,
        *(TRAIN[1:] if launcher is TORCHRUN else TRAIN),
        *run_args(
            demo_data, out, "--lr", "50", "--checkpoint-every", "1", "--keep-checkpoints", "100", "--log-every", "3"
        ),
    )
    errors = [line for line in done.stderr.splitlines() if "error" in line and "dali_ba.train" in line]
    if launcher is TORCHRUN:  # torchrun exits 1 for any failed rank, and names each rank's own code
        assert done.returncode == 1 and "exitcode  : 4 " in done.stderr and "Signal" not in done.stderr, tail(done)
    else:
        assert done.returncode == DivergedError.exit_code, tail(done)
    (line,) = errors
    (diverged,) = records(out, "diverged")
    step = diverged["step"]
    assert f"training diverged at step {step} " in line and "over --max-loss 100" in line
    assert f"lr {diverged['lr']:.4g}" in line and f"loss {diverged['loss']:.4g}" in line
    assert f"the last good one is {diverged['last_checkpoint']}" in line
    assert not re.search(r'File "[^"]*/dali_ba/', done.stderr), tail(done)  # no rank's traceback (torchrun has its own)
    assert diverged["loss"] > 100 and all(r["loss"] <= 100 for r in records(out, "step") if r["step"] < step)
    written = [load_checkpoint(path)["step"] for path in list_checkpoints(out)]
    assert written and max(written) == step - 1  # every step before it, none of its weights
    assert diverged["last_checkpoint"].endswith(f"step-{step - 1:09d}.pt")


def test_no_stop_on_divergence_keeps_the_old_behaviour(demo_data, tmp_path):
    out = tmp_path / "run"
    done = run_cli(*TRAIN, *run_args(demo_data, out, "--lr", "50", "--no-stop-on-divergence"))
    assert done.returncode in (0, 1), done.stderr[-2000:]  # trained to the end (digests of one rank: identical)
    assert not records(out, "diverged") and records(out, "summary")
    assert max(r["loss"] for r in records(out, "step")) > 100


def test_a_full_disk_stops_the_run_and_resume_auto_continues_exactly(demo_data, tmp_path, small_disk):
    """The output on a tmpfs that holds the run's first checkpoint but not the second: one line
    (the file, the free space, the last good checkpoint), exit 74, no temporary file; after the
    tmpfs grows, --resume auto ends with the parameters of an uninterrupted run."""
    reference = tmp_path / "reference"
    extra = ("--checkpoint-every", "2", "--keep-checkpoints", "1", "--log-every", "1")
    done = run_cli(*TRAIN, *run_args(demo_data, reference, *extra))
    assert done.returncode == 0, done.stderr[-2000:]
    size = list_checkpoints(reference)[0].stat().st_size
    subprocess.run(["mount", "-o", f"remount,size={int(1.6 * size) >> 10}k", str(small_disk)], check=True)
    out = small_disk / "run"
    stopped = run_cli(*TRAIN, *run_args(demo_data, out, *extra))
    assert stopped.returncode == OutputFullError.exit_code, stopped.stderr[-2000:]
    (line,) = [line for line in stopped.stderr.splitlines() if "error" in line]
    assert "no space left to write" in line and "MiB free of" in line and "--resume auto" in line
    assert "the last good checkpoint is" in line and "Traceback" not in stopped.stderr
    assert not [p for p in out.rglob("*.tmp")]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = run_cli(*TRAIN, *run_args(demo_data, out, *extra, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert records(out, "summary")[0]["param_digests"] == records(reference, "summary")[0]["param_digests"]


# Rank 0 takes 3 s to leave after the ranks have met (its interpreter's finalization, where Python's
# signal handlers are gone): torchrun SIGTERMs it as soon as rank 1 has exited 4.
SLOW_RANK_0_EXIT = """
import os, runpy, time

class SlowToLeave:
    def __del__(self):
        if os.environ.get("RANK") == "0":
            time.sleep(3)

keep = SlowToLeave()
runpy.run_module("dali_ba.train", run_name="__main__")
"""


def test_a_rank_slow_to_leave_still_ends_with_its_own_code_under_torchrun(demo_data, tmp_path):
    out = tmp_path / "run"
    flags = run_args(demo_data, out, "--lr", "50", "--log-every", "3")
    done = run_cli(*TORCHRUN, "--no-python", sys.executable, "-c", SLOW_RANK_0_EXIT, *TRAIN[3:], *flags)
    assert done.returncode == 1 and "Sending process" in done.stderr, tail(done)  # torchrun did signal rank 0
    assert done.stderr.count("exitcode  : 4 ") == 2 and "SIGTERM)" not in done.stderr, tail(done)


@pytest.mark.parametrize("launcher", [MPIRUN, TORCHRUN], ids=["mpirun-2-ranks", "torchrun-2-ranks"])
def test_a_full_disk_under_two_ranks_ends_every_rank_with_its_own_code(demo_data, tmp_path, small_disk, launcher):
    """Rank 0 writes the checkpoints and finds the disk full at the second: every rank leaves with 74
    (under torchrun, each rank's own code: none killed by a signal on its way out), one error line,
    no rank's traceback, no temporary file; the first checkpoint is intact for --resume auto."""
    reference = tmp_path / "reference"
    extra = ("--checkpoint-every", "2", "--keep-checkpoints", "1", "--log-every", "1")
    done = run_cli(*TRAIN, *run_args(demo_data, reference, *extra, "--max-steps", "2"))
    assert done.returncode == 0, tail(done)
    size = list_checkpoints(reference)[0].stat().st_size
    subprocess.run(["mount", "-o", f"remount,size={int(1.6 * size) >> 10}k", str(small_disk)], check=True)
    out = small_disk / "run"
    stopped = run_cli(*launcher, *(TRAIN[1:] if launcher is TORCHRUN else TRAIN), *run_args(demo_data, out, *extra))
    code = OutputFullError.exit_code
    if launcher is TORCHRUN:
        assert stopped.returncode == 1 and stopped.stderr.count(f"exitcode  : {code} ") == 2, tail(stopped)
        # A rank killed on its way out shows as "Signal N (...) received by PID" or a negative exit code,
        # which the count above excludes. torchrun's own "Sending process N closing signal SIGTERM" is
        # not one: it sends that to the other rank whenever one leaves first, which here is by chance.
        assert "Signal" not in stopped.stderr and "exitcode  : -" not in stopped.stderr, tail(stopped)
    else:
        assert stopped.returncode == code, tail(stopped)
    errors = [line for line in stopped.stderr.splitlines() if "error" in line and "dali_ba.train" in line]
    assert errors and all("no space left to write" in line for line in errors), tail(stopped)
    assert not re.search(r'File "[^"]*/dali_ba/', stopped.stderr), tail(stopped)
    assert not [p for p in out.rglob("*.tmp")]
    assert load_checkpoint(list_checkpoints(out)[-1])["step"] == 2
