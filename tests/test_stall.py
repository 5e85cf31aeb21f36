"""The stall rule (dali_ba/training/stall.py), on real processes: a rank stopped with SIGSTOP under each
engine, a read that never returns on a real (FUSE) file system, a slow rank that is left alone."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, last_logged_step, run_cli

from dali_ba.activity import Activity
from dali_ba.distributed.world import World
from dali_ba.training.stall import EXIT_STALLED, Beat, StallWatch, judge

PY = sys.executable
TIMEOUT = 15  # --stall-timeout of these runs
TRAIN = ["-m", "dali_ba.train", "--recipe", "pipelines/demo.toml"]
LAUNCH = {
    "horovod": ["mpirun", "-np", "2", *(["--allow-run-as-root"] if os.geteuid() == 0 else []), PY],
    "torch": [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
}
ENV = {**os.environ, "PATH": f"{Path(PY).parent}:{os.environ['PATH']}", "OMPI_MCA_mpi_yield_when_idle": "1"}


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
        "10",
        "--log-every",
        "1",
        "--checkpoint-every",
        "3",
        "--deterministic",
        "--stall-timeout",
        str(TIMEOUT),
        *extra,
    ]


def start(engine, demo_data, output, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [*LAUNCH[engine], *TRAIN, *args(demo_data, output, *extra)],
        cwd=REPO,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for(condition, job: subprocess.Popen, limit: float = 180) -> None:
    deadline = time.time() + limit
    while not condition():
        assert job.poll() is None, f"the run ended first (exit {job.returncode}): {job.stderr.read()[-2000:]}"
        assert time.time() < deadline, "the run never got there"
        time.sleep(0.1)


def rank_pid(output: Path, rank: int) -> int:
    return json.loads((output / "environment.json").read_text())["per_rank"][rank]["pid"]


def digest(output: Path) -> list[str]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    (summary,) = [r for r in records if r["kind"] == "summary"]
    return summary["param_digests"]


def beat(rank, phase="allreduce_step", idle=1.0, read=None, seq=1):
    return Beat(rank, f"n{rank}", 100 + rank, seq, phase, 1.0, 3, idle, read)


def test_judge_names_the_silent_the_reading_and_the_odd_one_out_and_never_the_slow():
    assert judge([beat(0, idle=14.0), beat(1, "forward_backward", idle=14.9)], [1.0, 14.0], 15) is None  # slow
    (silent,) = judge([beat(0, idle=16.0), beat(1, "data")], [0.5, 16.0], 15)
    assert silent[0] == 1 and "silent for 16 s" in silent[1] and "data of step 4" in silent[1]
    (reading,) = judge([beat(0, idle=20.0), beat(1, "data", read=("/d/x.jpg", 17.0))], [0.5, 0.5], 15)
    assert reading[0] == 1 and "/d/x.jpg" in reading[1]
    odd = judge([beat(0, idle=20.0), beat(1, "forward_backward", idle=20.0), beat(2, idle=20.0)], [0.5] * 3, 15)
    assert [rank for rank, _ in odd] == [1]  # the others wait for it in allreduce_step
    assert judge([beat(0, idle=20.0), beat(1, idle=20.0)], [0.5, 7.0], 15, grace=6) is None  # rank 1 falls silent
    assert [rank for rank, _ in judge([beat(0, idle=20.0), beat(1, idle=20.0)], [0.5, 0.5], 15, grace=6)] == [0, 1]
    paused = beat(1, "evaluation", idle=None)  # a silent rank whose clock was paused: three timeouts
    assert judge([beat(0, idle=None), paused], [0.5, 30.0], 15) is None
    assert judge([beat(0, idle=None), paused], [0.5, 46.0], 15)[0][0] == 1


@pytest.fixture(scope="module")
def slow_but_live(demo_data, tmp_path_factory):
    """Rank 1 stopped for 9 s twice (below the 15 s timeout) mid-epoch: a slow rank, never ended. The
    run finishes, and its parameters are those of every run below (the reference)."""
    out = tmp_path_factory.mktemp("slow") / "run"
    job = start("horovod", demo_data, out)
    try:
        wait_for(lambda: (out / "checkpoints" / "step-000000003.pt").exists(), job)
        rank1 = rank_pid(out, 1)
        for _ in range(2):
            os.kill(rank1, signal.SIGSTOP)
            time.sleep(9)
            os.kill(rank1, signal.SIGCONT)
            time.sleep(1)
        stdout, stderr = job.communicate(timeout=300)
    finally:
        job.kill()
    return job.returncode, stderr, out


def test_a_slow_rank_is_never_ended(slow_but_live):
    returncode, stderr, out = slow_but_live
    assert returncode == 0, stderr[-3000:]
    assert "stalled" not in stderr
    assert len(set(digest(out))) == 1


@pytest.mark.parametrize("engine", ["horovod", "torch"])
def test_a_stopped_rank_ends_the_job_named_and_resume_reaches_the_same_parameters(
    engine, demo_data, slow_but_live, tmp_path
):
    out = tmp_path / "run"
    job = start(engine, demo_data, out)
    rank1 = None
    try:
        # mid-epoch (the epoch has 10 steps), after its first checkpoint, in a step: not in the
        # checkpoint, where the stall clock is paused and silence is given three timeouts
        wait_for(lambda: (out / "checkpoints" / "step-000000003.pt").exists() and last_logged_step(out) >= 4, job)
        rank1 = rank_pid(out, 1)
        os.kill(rank1, signal.SIGSTOP)
        stopped = time.monotonic()
        stdout, stderr = job.communicate(timeout=TIMEOUT + 60)
        took = time.monotonic() - stopped
    finally:
        job.kill()
        if rank1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank1, signal.SIGKILL)
    (line,) = [line for line in stderr.splitlines() if "stalled (--stall-timeout" in line]
    # the rule: a rank silent in a step is judged after one timeout, in a checkpoint after three (a step
    # can be fast enough to reach the next checkpoint before the stop)
    paused = "last seen in checkpoint" in line
    assert took < (3 if paused else 1) * TIMEOUT + 30, f"the job took {took:.0f} s to end:\n{stderr[-3000:]}"
    # mpirun passes the first failed rank's status on; torchrun exits 1 and names it in its report
    assert (job.returncode == EXIT_STALLED) if engine == "horovod" else (f"exitcode  : {EXIT_STALLED}" in stderr), (
        stderr[-3000:]
    )
    assert "rank 1 (node " in line and "silent for" in line and "rank 0 waits in " in line
    assert paused or " of step " in line, line
    assert "step-000000003.pt" in line or "step-000000006.pt" in line or "step-000000009.pt" in line
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    resumed = run_cli(*LAUNCH[engine], *TRAIN, *args(demo_data, out, "--resume", "auto"), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert digest(out) == digest(slow_but_live[2])


@pytest.fixture
def hung_fs(demo_data, tmp_path):
    """demo_data behind a FUSE file system on which the 31st file read never returns."""
    mount, named = tmp_path / "mnt", tmp_path / "hung.txt"
    mount.mkdir()
    server = subprocess.Popen(
        [PY, str(REPO / "tests" / "hung_fs.py"), str(demo_data), str(mount), "30", str(named)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 30
        while not os.path.ismount(mount):
            assert server.poll() is None, f"the FUSE file system did not start: {server.stdout.read()}"
            assert time.time() < deadline, "the FUSE file system never mounted"
            time.sleep(0.1)
        yield mount, named
    finally:
        subprocess.run([shutil.which("fusermount3") or "fusermount3", "-u", "-z", str(mount)], capture_output=True)
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)


def hung_run(mount: Path, output: Path, timeout: float, stall_timeout: int) -> subprocess.CompletedProcess:
    return run_cli(
        PY,
        *TRAIN,
        "--train",
        str(mount / "train"),
        "--val",
        str(mount / "val"),
        "--output",
        str(output),
        "--batch-size",
        "16",
        "--views",
        "2",
        "--epochs",
        "1",
        "--max-steps",
        "10",
        "--stall-timeout",
        str(stall_timeout),
        timeout=timeout,
    )


def test_a_read_that_never_returns_ends_the_run_naming_the_file(hung_fs, tmp_path):
    mount, named = hung_fs
    started = time.monotonic()
    done = hung_run(mount, tmp_path / "run", timeout=180, stall_timeout=TIMEOUT)
    assert done.returncode == EXIT_STALLED, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if "stalled (--stall-timeout" in line]
    assert f"on a read of {named.read_text()}" in line and "rank 0 (node " in line
    assert time.monotonic() - started < 120


def test_without_the_stall_timeout_a_read_that_never_returns_waits(hung_fs, tmp_path):
    mount, named = hung_fs
    with pytest.raises(subprocess.TimeoutExpired):
        hung_run(mount, tmp_path / "run", timeout=20 + 2 * TIMEOUT, stall_timeout=0)
    assert named.exists()  # the hung read was reached, and nothing ended the run


class RankZeroOfTwo(World):
    """Rank 0 of a two-rank world whose rank 1 never posts: the watch's store call blocks."""

    def __init__(self) -> None:
        super().__init__(0, 2)

    def gather(self, value):
        return [value, None]

    def sum(self, values):
        return np.asarray(values, dtype=np.float64)


def test_stop_waits_for_the_watch_thread_even_inside_a_store_call():
    """A daemon thread still inside a store call (C++, GIL released) at interpreter exit is ended by
    CPython mid-destructor and the process aborts: stop() returns only once the thread has ended."""
    said = []
    watch = StallWatch(RankZeroOfTwo(), 3, lambda: None, said.append, Activity()).start()
    time.sleep(1.0)  # the thread now waits in multi_get for rank 1's beat, for up to its 5 s timeout
    assert watch._thread.is_alive()
    watch.stop()
    assert not watch._thread.is_alive() and said == []
