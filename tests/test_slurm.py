"""The batch templates in slurm/, submitted with sbatch to a real one-node SLURM started for this module.

Every job is the CPU version of a template: 2 ranks (1 for the array tasks, which then run side by
side), --gpus-per-node=0, a small synthetic dataset and a few steps. If SLURM cannot start here the
tests fail with the reason; they are never skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from slurm_jobs import SMALL, assert_completed, job_environment, records, running_cluster, slurm_output, submit

from dali_ba.recipe import load_recipe

CPU = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1"]
EPOCHS, MAX_STEPS = 3, 6  # 18 steps: long enough to signal a running job, short enough to be quick
PHASES = ("data", "h2d", "forward_backward", "allreduce_step", "step")


@pytest.fixture(scope="module")
def slurm(request):
    yield from running_cluster(request)


@pytest.fixture(scope="module")
def job_env(slurm, demo_data) -> dict[str, str]:
    return job_environment(slurm, demo_data)


@pytest.fixture(scope="module")
def uninterrupted(slurm, job_env) -> tuple[str, Path]:
    """resnet50_ba.sh as 2 CPU ranks, EPOCHS x MAX_STEPS steps, run to the end: (job id, job folder)."""
    job_id = submit(
        slurm,
        "resnet50_ba.sh",
        *CPU,
        "--ntasks-per-node=2",
        **job_env,
        EPOCHS=str(EPOCHS),
        CHECKPOINT_EVERY="",
        EXTRA_ARGS=f"{SMALL} --max-steps {MAX_STEPS}",
    )
    (task,) = slurm.wait(job_id, timeout=180)
    assert_completed(slurm, task, "resnet50_ba", job_id)
    return job_id, slurm.root / "runs" / f"resnet50_ba-{job_id}"


def test_resnet50_template_trains_and_writes_its_job_folder(slurm, uninterrupted):
    job_id, job_dir = uninterrupted
    saved = load_recipe(job_dir / "recipe.toml")  # the resolved recipe: the file plus the overrides
    assert (saved.model.arch, saved.data.views, saved.data.batch_size, saved.optim.epochs) == (
        "resnet20",
        2,
        16,
        EPOCHS,
    )
    assert saved.data.train.endswith("train") and saved.optim.lr_batch == 256  # the rest from the recipe
    job_txt = (job_dir / "job.txt").read_text()
    assert f"start 0 of job {job_id}" in job_txt and "srun: slurm-wlm" in job_txt and f"JobId={job_id}" in job_txt
    (summary,) = records(job_dir, "summary")
    assert (summary["steps"], summary["ranks"], summary["views"]) == (EPOCHS * MAX_STEPS, 2, 2)
    assert summary["params_identical"] and (job_dir / "model.pt").stat().st_size > 0
    assert "parameters identical on 2 rank(s)" in slurm_output(slurm, "resnet50_ba", job_id)
    # The environment summary, per-step phase timing over both ranks, the epoch-end checkpoint.
    environment = json.loads((job_dir / "environment.json").read_text())
    assert environment["ranks"] == 2 and environment["slurm"]["SLURM_JOB_ID"] == job_id
    assert environment["nodes"] == [slurm.node]
    (start,) = records(job_dir, "start")
    assert (start["ranks"], start["resumed_from"]) == (2, None)
    steps = records(job_dir, "step")
    assert [s["step"] for s in steps] == list(range(1, EPOCHS * MAX_STEPS + 1))
    for s in steps:
        assert set(PHASES) <= s["time"].keys() and s["time"]["step"]["mean"] > 0
        assert s["time"]["step"]["slowest_rank"] in (0, 1)
    assert (job_dir / "checkpoints" / f"step-{EPOCHS * MAX_STEPS:09d}.pt").is_file()  # written at each epoch end


def test_preempted_job_checkpoints_requeues_and_finishes_where_it_stopped(slurm, job_env, uninterrupted):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@<grace> sends before the time limit) stops
    the ranks after a step with a checkpoint; the job requeues itself and resumes to the same end."""
    total = EPOCHS * MAX_STEPS
    job_id = submit(
        slurm,
        "resnet50_ba.sh",
        *CPU,
        "--ntasks-per-node=2",
        **job_env,
        EPOCHS=str(EPOCHS),
        CHECKPOINT_EVERY="",
        EXTRA_ARGS=f"{SMALL} --max-steps {MAX_STEPS}",
    )
    job_dir = slurm.root / "runs" / f"resnet50_ba-{job_id}"
    slurm.wait(
        job_id,
        timeout=120,
        until=lambda tasks: (
            len(records(job_dir, "step")) >= 2
            or tasks[0]["JobState"] != "RUNNING"
            and tasks[0]["JobState"] != "PENDING"
        ),
    )
    signalled = subprocess.run(
        ["scancel", "--signal=USR1", "--batch", job_id], env=slurm.env, capture_output=True, text=True
    )
    assert signalled.returncode == 0, signalled.stderr
    # The job comes back pending (Restarts=1).
    (task,) = slurm.wait(
        job_id,
        timeout=60,
        until=lambda tasks: tasks[0]["Restarts"] == "1" or tasks[0]["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"),
    )
    output = slurm_output(slurm, "resnet50_ba", job_id)
    assert task["Restarts"] == "1", f"job not requeued ({task['JobState']}):\n{output[-3000:]}"
    assert "batch: SIGUSR1" in output and f"requeueing job {job_id}" in output
    (stop,) = records(job_dir, "stop")
    assert 2 <= stop["step"] < total and stop["signal"] == "SIGUSR1"
    assert (job_dir / "checkpoints" / f"step-{stop['step']:09d}.pt").is_file()
    # SLURM itself starts the requeued job once its first start's job credential has expired
    # (cred_expire, 10 s on this test cluster, 120 s by default). Forcing it sooner (StartTime=now,
    # as this test once did) races that expiry: slurmd still holds the revoked credential, refuses
    # the launch ("Job credential revoked") and the job ends FAILED 1:0.
    (task,) = slurm.wait(job_id, timeout=180)
    assert_completed(slurm, task, "resnet50_ba", job_id)
    assert task["Restarts"] == "1"

    first, second = records(job_dir, "start")
    assert (first["resumed_from"], second["resumed_from"]) == (None, stop["step"])
    assert [s["step"] for s in records(job_dir, "step")] == list(range(1, total + 1))  # each step once
    (summary,) = records(job_dir, "summary")
    assert summary["steps"] == total and summary["params_identical"]
    (reference,) = records(uninterrupted[1], "summary")
    assert summary["param_digests"] == reference["param_digests"]  # the same model as the run never stopped
    assert "start 1 of job" in (job_dir / "job.txt").read_text()
    assert json.loads((job_dir / "environment.json").read_text())["slurm"]["SLURM_RESTART_COUNT"] == "1"


def test_torch_engine_template_trains_like_horovod(slurm, job_env, uninterrupted):
    """ENGINE=torch: plain srun (no MPI), torch.distributed meeting at the job's first node; the same
    model as the Horovod job of the same settings."""
    job_id = submit(
        slurm,
        "resnet50_ba.sh",
        *CPU,
        "--ntasks-per-node=2",
        **job_env,
        ENGINE="torch",
        EPOCHS=str(EPOCHS),
        CHECKPOINT_EVERY="",
        EXTRA_ARGS=f"{SMALL} --max-steps {MAX_STEPS}",
    )
    (task,) = slurm.wait(job_id, timeout=180)
    assert_completed(slurm, task, "resnet50_ba", job_id)
    job_dir = slurm.root / "runs" / f"resnet50_ba-{job_id}"
    (start,) = records(job_dir, "start")
    assert (start["engine"], start["engine_backend"], start["ranks"]) == ("torch", "gloo", 2)
    assert "srun without MPI" in start["engine_reason"] and "--engine torch" in start["engine_reason"]
    (summary,) = records(job_dir, "summary")
    assert summary["steps"] == EPOCHS * MAX_STEPS and summary["params_identical"]
    horovod = torch.load(uninterrupted[1] / "model.pt", weights_only=True)
    for name, tensor in torch.load(job_dir / "model.pt", weights_only=True).items():
        torch.testing.assert_close(tensor.float(), horovod[name].float(), rtol=1e-4, atol=1e-5, msg=name)


def test_template_rejects_an_unknown_engine(slurm, job_env):
    job_id = submit(slurm, "resnet50_ba.sh", *CPU, "--ntasks-per-node=1", **job_env, ENGINE="mpi")
    (task,) = slurm.wait(job_id, timeout=60)
    assert (task["JobState"], task["ExitCode"]) == ("FAILED", "2:0")
    assert "error: ENGINE=mpi: must be horovod or torch" in slurm_output(slurm, "resnet50_ba", job_id)


def test_cifar_array_runs_one_task_per_listed_m(slurm, job_env):
    """A 2-task sub-array of the Figure 2-4 array: M=1 and regime adaptation with M=2 (Figure 4's
    B*M unique images per step, one view, M x the epochs), each in its own job folder."""
    job_id = submit(
        slurm,
        "resnet44_cifar_ba.sh",
        *CPU,
        "--array=0-1",
        "--ntasks-per-node=1",
        **job_env,
        VIEWS_LIST="1 ra2",
        EPOCHS="1",
        EXTRA_ARGS=f"{SMALL} --max-steps 3",
    )
    tasks = slurm.wait(job_id, timeout=180)
    assert len(tasks) == 2
    for task in tasks:
        assert_completed(slurm, task, "resnet44_cifar_ba", f"{job_id}_{task['ArrayTaskId']}")
    folders = {i: slurm.root / "runs" / f"resnet44_cifar_ba-{job_id}_{i}" for i in (0, 1)}
    assert load_recipe(folders[0] / "recipe.toml").data.views == 1
    (summary,) = records(folders[0], "summary")
    assert (summary["views"], summary["batch_size"], summary["steps"]) == (1, 16, 3)
    # The RA task trains B*M unique images x 1 view per step, for M x the epochs.
    ra = load_recipe(folders[1] / "recipe.toml")
    assert (ra.optim.regime, ra.data.views, ra.model.arch) == ("ra", 2, "resnet20")
    (start,) = records(folders[1], "start")
    assert (start["regime"], start["views"], start["batch_size"], start["epochs"]) == ("ra", 1, 32, 2)
    assert records(folders[1], "summary")[0]["steps"] == 2 * 3


def test_scaling_sweep_collects_one_table(slurm, job_env):
    """ranks {2} x M {1, 2}: one profile step per point, then one collected table."""
    job_id = submit(
        slurm,
        "scaling.sh",
        *CPU,
        "--ntasks-per-node=2",
        **job_env,
        RECIPE="pipelines/demo.toml",
        RANKS_LIST="2",
        VIEWS_LIST="1 2",
        STEPS="3",
        WARMUP="1",
        EXTRA_ARGS="--dali-threads 1 --torch-threads 1",
    )
    (task,) = slurm.wait(job_id, timeout=180)
    assert_completed(slurm, task, "scaling", job_id)
    job_dir = slurm.root / "runs" / f"scaling-{job_id}"
    for point in ("r2_m1", "r2_m2"):
        assert json.loads((job_dir / point / "profile_step.json").read_text())
    table = [line for line in (job_dir / "scaling.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2  # header, separator, one row per point


def test_template_reports_a_missing_recipe(slurm, job_env):
    job_id = submit(slurm, "resnet50_ba.sh", *CPU, "--ntasks-per-node=1", **job_env, RECIPE="pipelines/nope.toml")
    (task,) = slurm.wait(job_id, timeout=60)
    assert (task["JobState"], task["ExitCode"]) == ("FAILED", "2:0")
    assert "error: RECIPE=pipelines/nope.toml: no such recipe file" in slurm_output(slurm, "resnet50_ba", job_id)


def test_host_list_inside_an_allocation(slurm):
    """launch/slurm_hosts.py in a job: the allocation's node with its task count, as horovodrun -H wants."""
    job_id = slurm.sbatch(
        *CPU,
        "--ntasks-per-node=2",
        f"--output={slurm.root}/hosts-%j.out",
        "--wrap",
        f"{sys.executable} launch/slurm_hosts.py",
        cwd=REPO,
    )
    slurm.wait(job_id, timeout=60)
    assert (slurm.root / f"hosts-{job_id}.out").read_text().split() == [f"{slurm.node}:2"]
    # With scontrol answering (this cluster's config) and without (no config: the Python expansion).
    nodelist = "gpu[01-03,07],login-a1,r[1-2]-n[08-10]"
    expected = [
        "gpu01",
        "gpu02",
        "gpu03",
        "gpu07",
        "login-a1",
        "r1-n08",
        "r1-n09",
        "r1-n10",
        "r2-n08",
        "r2-n09",
        "r2-n10",
    ]
    scontrol = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], env=slurm.env, capture_output=True, text=True
    )
    assert scontrol.stdout.split() == expected
    for conf in (str(slurm.conf), "/nonexistent/slurm.conf"):
        done = subprocess.run(
            [sys.executable, "launch/slurm_hosts.py", nodelist, "--slots", "4"],
            cwd=REPO,
            env={**slurm.env, "SLURM_CONF": conf},
            capture_output=True,
            text=True,
        )
        assert done.stdout.strip() == ",".join(f"{host}:4" for host in expected), done.stderr


def test_the_doctor_under_a_plain_srun_names_a_task_that_never_reports(slurm):
    """Two tasks of srun --mpi=none (the torch engine's launcher), the second never starting the doctor:
    rank 0 names it after --timeout through its own store, and the step ends."""
    report = slurm.root / "doctor-lost.json"
    task = (
        f'if [ "$SLURM_PROCID" = 1 ]; then exec sleep 120; else exec {sys.executable} -m dali_ba.doctor '
        f"--timeout 5 --json {report}; fi"
    )
    job_id = slurm.sbatch(
        *CPU,
        "--ntasks-per-node=2",
        f"--output={slurm.root}/doctor-lost-%j.out",
        "--wrap",
        f"srun --mpi=none --kill-on-bad-exit=1 sh -c '{task}'",
        cwd=REPO,
    )
    (done,) = slurm.wait(job_id, timeout=150)
    output = (slurm.root / f"doctor-lost-{job_id}.out").read_text()
    assert done["JobState"] == "FAILED", output[-3000:]
    assert "rank 1 did not report" in output, output[-3000:]
    (lost,) = [p for p in json.loads(report.read_text())["problems"] if p["check"] == "ranks"]
    assert lost["ranks"] == [1] and "did not report within --timeout" in lost["text"]


@pytest.mark.parametrize("stalls_before, requeued", [(0, True), (1, True), (2, False)])
def test_a_stall_requeues_the_job_up_to_max_stall_requeues_times(tmp_path, stalls_before, requeued):
    """slurm/lib.sh after exit 76: scontrol requeue (a stand-in on PATH records it) and a job.txt line,
    until MAX_STALL_REQUEUES (2) stalls are on record; then one line and no requeue."""
    (tmp_path / "job.txt").write_text(
        "".join("=== 2026 stalled with exit 76 on n2; requeued\n" for _ in range(stalls_before))
    )
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    script = (
        f"EXIT_STALLED=76; JOB_DIR={tmp_path}; SLURM_JOB_ID=7; PATH={tmp_path}/bin:$PATH; "
        f'source <(sed -n "/^_dali_ba_requeue_after_stall()/,/^}}/p" {REPO}/slurm/lib.sh); '
        f"_dali_ba_requeue_after_stall n2"
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    calls = (tmp_path / "scontrol.calls").read_text() if (tmp_path / "scontrol.calls").exists() else ""
    last = (tmp_path / "job.txt").read_text().splitlines()[-1]
    if requeued:
        assert calls == "requeue 7\n" and last.endswith("stalled with exit 76 on n2; requeued"), done.stderr
        assert f"(stall {stalls_before + 1} of at most 2 requeued)" in done.stdout
    else:
        assert calls == "" and last.endswith("stalled with exit 76 on n2; not requeued")
        assert "not requeued (MAX_STALL_REQUEUES=2)" in done.stderr


@pytest.mark.parametrize(
    "srun_said, srun_status, status, blamed",
    [
        # kill -9 of rank 1; rank 0's collectives failed and it exited 1 before srun heard of the kill
        ("n1: task 0: Exited with exit code 1\nn2: task 1: Killed", 137, 137, "rank 1 on node n2 failed (Killed)"),
        # a bad input found by rank 0; srun then ended the others with SIGTERM: the step's status is rank 0's
        (
            "n1: task 0: Exited with exit code 2\nn1: task 1: Terminated\nn2: tasks 2-3: Terminated",
            143,
            2,
            "rank 0 on node n1 failed (Exited with exit code 2)",
        ),
        # ranks stopping together after a checkpoint: a resumable stop, nothing to blame
        ("n2: task 1: Exited with exit code 75\nn1: task 0: Terminated", 143, 75, None),
        # a stall: rank 0 named the stalled rank and left with 76, srun killed the stopped one; the stall is the cause
        ("n1: task 0: Exited with exit code 76\nn2: task 1: Killed", 137, 76, None),
    ],
)
def test_the_batch_log_names_the_rank_that_failed_first(tmp_path, srun_said, srun_status, status, blamed):
    """slurm/lib.sh reads srun's error lines after a failed step: the rank and node that caused it,
    and the status the job ends with."""
    log = tmp_path / "srun.err"
    log.write_text("".join(f"srun: error: {line}\n" for line in srun_said.splitlines()))
    script = (
        f"EXIT_RESUMABLE=75; EXIT_STALLED=76; "
        f'source <(sed -n "/^_dali_ba_first_failure()/,/^}}/p" {REPO}/slurm/lib.sh); '
        f'_dali_ba_first_failure {srun_status} {log}; echo "status $STEP_RC"'
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert done.stdout.split() == ["status", str(status)], done.stderr
    if blamed:
        assert done.stderr == f"batch: the training step failed (exit {status}): {blamed}; srun ended the other ranks\n"
    else:
        assert done.stderr == ""
