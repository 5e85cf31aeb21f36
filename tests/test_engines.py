"""The two engines: which one a launcher gets, torch.distributed (torchrun) against Horovod, the torch
engine's chunked step and exact resume, and training where Horovod is not installed."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO, keep_output, run_cli, tail

from dali_ba.distributed.launcher import choose_engine
from dali_ba.errors import UsageError
from dali_ba.training.checkpoint import list_checkpoints, load_checkpoint
from dali_ba.training.preemption import EXIT_RESUMABLE

PY = sys.executable
TRAIN = ["-m", "dali_ba.train", "--recipe", "pipelines/demo.toml"]
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
HOROVODRUN = ["horovodrun", "-np", "2"]
EVALUATION = ["--eval-views", "2", "--calibrate-bn", "2"]  # both exact over ranks: equal under both engines
TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29400"}
SRUN_ENV = {
    "SLURM_PROCID": "1",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_ID": "3",
    "SLURM_LOCALID": "0",
    "SLURM_JOB_ID": "4321",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_CONF": "/nonexistent",
}


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
        "4",
        "--log-every",
        "1",
        "--deterministic",
        *extra,
    ]


def records(output, kind):
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def summary(output):
    (record,) = records(output, "summary")
    return record


def torch_backend() -> str:
    """The torch engine's backend on this machine: NCCL where a GPU is visible, else Gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


@pytest.mark.parametrize(
    "requested, env, horovod, engine, launcher, reason",
    [
        ("auto", {}, True, "none", "none", "one process, no launcher"),
        ("auto", TORCHRUN_ENV, True, "torch", "torchrun", "torchrun"),
        ("auto", {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"}, True, "horovod", "mpi", "MPI launcher"),
        ("auto", {"PMIX_RANK": "0", **SRUN_ENV}, True, "horovod", "mpi", "MPI launcher"),  # srun --mpi=pmix
        (
            "auto",
            {"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"},
            True,
            "horovod",
            "mpi",
            "MPI launcher",
        ),  # horovodrun --gloo
        ("auto", SRUN_ENV, True, "torch", "srun", "srun without MPI"),
        (
            "auto",
            {k: v for k, v in SRUN_ENV.items() if "STEP" not in k},
            True,
            "none",
            "none",
            "one process",
        ),  # batch shell
        ("torch", {}, True, "torch", "none", "--engine torch"),
        ("torch", {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, False, "torch", "mpi", "--engine torch"),
        ("horovod", {}, True, "horovod", "none", "--engine horovod"),
    ],
)
def test_the_launcher_picks_the_engine(requested, env, horovod, engine, launcher, reason):
    choice = choose_engine(requested, env, horovod=horovod)
    assert (choice.engine, choice.launch.launcher) == (engine, launcher)
    assert reason in choice.reason


def test_srun_rendezvous_is_the_first_node_of_the_step():
    launch = choose_engine("auto", SRUN_ENV, horovod=False).launch
    assert (launch.rank, launch.size, launch.local_rank) == (1, 2, 0)
    assert (launch.master_addr, launch.master_port) == ("gpu07", 29500 + (4321 + 3) % 2000)
    launch = choose_engine("auto", {**SRUN_ENV, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}, horovod=False).launch
    assert (launch.master_addr, launch.master_port) == ("head", 1234)


@pytest.mark.parametrize(
    "requested, env, horovod, message",
    [
        ("mpi", {}, True, "--engine must be one of auto, horovod, torch, got 'mpi'"),
        ("horovod", {}, False, "--engine horovod: Horovod is not installed here"),
        ("horovod", TORCHRUN_ENV, True, "started by torchrun"),
        ("auto", {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, False, "Horovod is not installed"),
    ],
)
def test_an_engine_that_cannot_run_here_is_a_usage_error(requested, env, horovod, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        choose_engine(requested, env, horovod=horovod)


class OldDDP:
    """DistributedDataParallel before torch 2.13: ``broadcast_buffers``, no ``forward_sync_buffers``."""

    def __init__(self, module, device_ids=None, broadcast_buffers=True):
        self.buffers = {"broadcast_buffers": broadcast_buffers}

    def register_comm_hook(self, state, hook):
        pass


class NewDDP(OldDDP):
    """DistributedDataParallel with ``forward_sync_buffers`` only."""

    def __init__(self, module, device_ids=None, forward_sync_buffers=None):
        self.buffers = {"forward_sync_buffers": forward_sync_buffers}


@pytest.mark.parametrize("ddp, keyword", [(OldDDP, "broadcast_buffers"), (NewDDP, "forward_sync_buffers")])
def test_ddp_gets_the_buffer_keyword_its_torch_knows(monkeypatch, ddp, keyword):
    from dali_ba.distributed.torch_engine import DDPSync, buffer_sync_keyword

    assert buffer_sync_keyword(["self", "module", keyword]) == keyword
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", ddp)
    model = torch.nn.Linear(2, 2)
    sync = DDPSync(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))
    assert sync.model.buffers == {keyword: False}


def test_chunked_ddp_step_equals_one_batch_on_both_ranks_with_one_allreduce(tmp_path):
    out = tmp_path / "step.pt"
    done = run_cli(*TORCHRUN, "tests/engine_step_worker.py", str(out), timeout=180)
    assert done.returncode == 0, tail(done)
    result = torch.load(out)
    assert result["allreduces1"] == result["allreduces3"] >= 1  # no_sync: the 3 chunks allreduce once
    for chunks in ("chunks1", "chunks3"):  # both ranks' batches averaged = one process on both batches
        for name, reference in result["reference"].items():
            torch.testing.assert_close(result[chunks][name], reference, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def horovod_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("horovod") / "run"
    done = run_cli(*HOROVODRUN, PY, *TRAIN, *args(demo_data, out, *EVALUATION))
    assert done.returncode == 0, tail(done)
    return out


@pytest.fixture(scope="module")
def torch_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch") / "run"
    done = run_cli(*TORCHRUN, *TRAIN, *args(demo_data, out, *EVALUATION))
    assert done.returncode == 0, tail(done)
    assert f"engine torch ({torch_backend()}): started by torchrun" in done.stdout
    return out


def test_torchrun_trains_two_ranks_like_horovod(horovod_run, torch_run):
    ours = summary(torch_run)
    assert ours["ranks"] == 2 and ours["params_identical"]
    assert ours["param_digests"][0] == ours["param_digests"][1]
    (start,) = records(torch_run, "start")
    assert (start["engine"], start["engine_backend"]) == ("torch", torch_backend()) and "torchrun" in start[
        "engine_reason"
    ]
    assert records(horovod_run, "start")[0]["engine"] == "horovod"
    environment = json.loads((torch_run / "environment.json").read_text())
    assert environment["engine"]["engine"] == "torch" and environment["engine"]["backend"] == torch_backend()
    assert {r["rank"] for r in environment["per_rank"]} == {0, 1}
    # Same seed, same shards, same augmentations: the same model as Horovod's, to float tolerance.
    theirs = torch.load(horovod_run / "model.pt", weights_only=True)
    mine = torch.load(torch_run / "model.pt", weights_only=True)
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name].float(), theirs[name].float(), rtol=1e-4, atol=1e-5, msg=name)
    for key in ("train_loss", "top1", "views_top1", "calibrated_top1", "calibrated_val_loss"):
        assert [e[key] for e in records(torch_run, "epoch")] == pytest.approx(
            [e[key] for e in records(horovod_run, "epoch")], rel=1e-4
        ), key
    # DDP's wait inside backward is charged to allreduce_step, not forward_backward.
    steps = records(torch_run, "step")
    assert all(s["time"]["allreduce_step"]["max"] > 0 for s in steps)


def test_torch_engine_resume_after_a_signal_to_one_rank_is_exact(demo_data, torch_run, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PATH": f"{os.path.dirname(PY)}:{os.environ['PATH']}"}
    command = [*TORCHRUN, *TRAIN, *args(demo_data, out, *EVALUATION)]
    job = subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # environment.json is written after every rank has installed its signal handlers: signal rank 1
    # then, and both ranks stop after the same (early) step.
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "environment.json").exists():
        time.sleep(0.05)
    time.sleep(0.05)
    rank1 = json.loads((out / "environment.json").read_text())["per_rank"][1]["pid"]
    os.kill(rank1, signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=120)
    stopped = subprocess.CompletedProcess(command, job.returncode, stdout, stderr)
    stopped.log = keep_output(command, stopped.stdout, stopped.stderr)  # type: ignore[attr-defined]
    (stop,) = records(out, "stop")
    assert stop["signal"] == "SIGUSR1" and stop["signalled_ranks"] == [1] and stop["step"] < 8, tail(stopped)
    assert "run again with --resume auto" in stopped.stderr, tail(stopped)
    # torchrun reports the ranks' exit code 75 (not a signal: a rank that aborted on its way out)
    assert f"exitcode  : {EXIT_RESUMABLE}" in stopped.stderr and "Signal" not in stopped.stderr, tail(stopped)
    state = load_checkpoint(list_checkpoints(out)[0])
    assert state["step"] == stop["step"] and state["run"]["ranks"] == 2
    resumed = run_cli(*TORCHRUN, *TRAIN, *args(demo_data, out, *EVALUATION, "--resume", "auto"))
    assert resumed.returncode == 0, tail(resumed)
    assert records(out, "start")[-1]["resumed_from"] == stop["step"]
    assert sorted({r["step"] for r in records(out, "step")}) == list(range(1, 9))
    assert summary(out)["param_digests"] == summary(torch_run)["param_digests"]


def hidden(folder, *packages: str) -> dict[str, str]:
    """Environment in which ``import <package>`` fails for each of ``packages``, as where they were
    never installed (a sitecustomize drops them from the path finder)."""
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(f"""\
        import sys
        from importlib.machinery import PathFinder

        HIDDEN = {packages!r}

        class Without(PathFinder):
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name.split(".")[0] in HIDDEN:
                    return None
                return super().find_spec(name, path, target)

        sys.meta_path[sys.meta_path.index(PathFinder)] = Without
    """)
    )
    return {"PYTHONPATH": str(folder)}


def test_torch_engine_under_mpirun_meets_through_mpi(demo_data, torch_run, tmp_path):
    """--engine torch under mpirun (no torchrun, no SLURM): rank 0 names the rendezvous over MPI."""
    out = tmp_path / "run"
    mpirun = ["mpirun", "-np", "2", *(["--allow-run-as-root"] if os.geteuid() == 0 else [])]
    done = run_cli(*mpirun, PY, *TRAIN, *args(demo_data, out, *EVALUATION, "--engine", "torch"))
    assert done.returncode == 0, tail(done)
    (start,) = records(out, "start")
    assert (start["engine"], start["engine_backend"]) == ("torch", torch_backend()) and "MPI launcher" in start[
        "engine_reason"
    ]
    assert summary(out)["param_digests"] == summary(torch_run)["param_digests"]  # the torchrun run's model


@pytest.fixture
def without_horovod(tmp_path) -> dict[str, str]:
    return hidden(tmp_path / "hide_horovod", "horovod")


def test_one_process_trains_where_horovod_is_not_installed(demo_data, tmp_path, without_horovod):
    probe = run_cli(
        PY,
        "-c",
        "import importlib.util, sys, dali_ba.train, dali_ba.tools.profile\n"
        "assert importlib.util.find_spec('horovod') is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('horovod')))",
        env=without_horovod,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stderr
    out = tmp_path / "run"
    done = run_cli(PY, *TRAIN, *args(demo_data, out, "--epochs", "1", "--max-steps", "3"), env=without_horovod)
    assert done.returncode == 0, tail(done)
    assert "engine none: one process, no launcher" in done.stdout
    assert [s["step"] for s in records(out, "step")] == [1, 2, 3] and summary(out)["params_identical"]
    # The torch engine asked for as one process: a world of one over Gloo, still no Horovod.
    out = tmp_path / "torch"
    done = run_cli(
        PY, *TRAIN, *args(demo_data, out, "--epochs", "1", "--max-steps", "2", "--engine", "torch"), env=without_horovod
    )
    assert done.returncode == 0, tail(done)
    assert records(out, "start")[0]["engine_backend"] == torch_backend()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--engine", "horovod"], "--engine horovod: Horovod is not installed here"),
        (["--engine", "mpi"], r"--engine \(\[run\] engine\) must be auto, horovod or torch, got 'mpi'"),
        (["--horovod-timeline", "t.json"], "--horovod-timeline needs the Horovod engine; this run uses none"),
    ],
)
def test_engine_bad_input_is_one_line(demo_data, tmp_path, without_horovod, flags, message):
    out = tmp_path / "run"
    done = run_cli(PY, *TRAIN, *args(demo_data, out, *flags), env=without_horovod, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not out.exists()


# Rank 0 leaves at once (its exit shuts Horovod down on rank 1, and Horovod finalizes MPI there); rank 1
# then asks for a sum over mpi4py, which would abort the process: the engine says the peer has gone.
PEER_LEFT = """
import sys, time
from horovod.common.exceptions import HorovodInternalError
from dali_ba.distributed.horovod_engine import HorovodWorld

world = HorovodWorld("mpirun")
if world.rank == 0:
    sys.exit(0)
time.sleep(2)
try:
    world.sum([1.0])
except HorovodInternalError as exc:
    print("peer gone:", exc)
"""


def test_a_horovod_rank_whose_peer_left_gets_horovods_error_not_an_mpi_abort():
    done = run_cli("mpirun", "-np", "2", *(["--allow-run-as-root"] if os.geteuid() == 0 else []), PY, "-c", PEER_LEFT)
    assert done.returncode == 0, tail(done)
    assert "peer gone: MPI was finalized: another rank has left the job" in done.stdout, tail(done)
    assert "MPI_FINALIZE" not in done.stderr and "NULL communicator" not in done.stderr
