"""SLURM nodes simulated on this machine (tests/slurm_cluster.py, loopback only): the batch templates
across two nodes, n1 and n2, under both engines, torchrun's rendezvous, the scaling table, the doctor,
and what a dead node (n3, so that the others' jobs run on while it is down) or a dead rank does to a job.

Every job is the CPU version of a template (resnet20, 32 px views, B=16, M=2). Real sbatch/srun, real
Horovod over Open MPI (srun --mpi=pmix, TCP between the nodes' loopback addresses), real
torch.distributed over Gloo. If the cluster cannot start here the tests fail with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, last_logged_step
from slurm_jobs import SMALL, assert_completed, job_environment, records, running_cluster, slurm_output, submit

NODES = ("n1", "n2")  # the two-node jobs'; n3 is the one that dies
CPU = ["--gpus-per-node=0", "--cpus-per-task=1"]
EPOCHS, MAX_STEPS = 2, 6  # 12 steps, a checkpoint at each epoch's end
# The models trained on one node (n1), as references: (engine, ranks) -> job id. Two ranks' sum is the
# same in any order, so one reference serves both engines; four ranks' is not (Gloo's ring adds in
# another order than Open MPI, and 18 steps make that 1e-2), so each engine has its own.
ONE_NODE = [("horovod", 2), ("horovod", 4), ("torch", 4)]


@pytest.fixture(scope="module")
def cluster(request):
    # 8 CPUs declared per node, though the machine has 2 cores: the machine's cores set the pace, and
    # SLURM runs side by side no more than 8 ranks a node (each takes about 0.9 GB). Short timeouts
    # (SLURM's defaults: 30, 120 and 10 s) make a cancelled step, a requeue and a dead node quick.
    yield from running_cluster(request, nodes=3, cpus=8, kill_wait=5, cred_expire=5, message_timeout=5)


@pytest.fixture(scope="module")
def job_env(cluster, demo_data) -> dict[str, str]:
    env = job_environment(cluster, demo_data)
    # Only rank 0 writes the run folder: on n2 the job folders are read-only (a bind mount inside n2's
    # mount namespace, until n2 is restarted), so any write from a rank there fails its job.
    runs = Path(env["OUTPUT_ROOT"])
    runs.mkdir()
    for command in (["mount", "--bind", str(runs), str(runs)], ["mount", "-o", "remount,bind,ro", str(runs)]):
        done = cluster.on_node("n2", *command)
        assert done.returncode == 0, done.stderr
    return env


def train(
    cluster, job_env, engine: str, nodes: int, per_node: int, epochs: int = EPOCHS, where: str = "", **env: str
) -> str:
    """Submit slurm/resnet50_ba.sh: ``nodes`` x ``per_node`` CPU ranks of ``engine`` on n1 (and n2),
    or the nodes ``where`` lists; returns the job id."""
    return submit(
        cluster,
        "resnet50_ba.sh",
        f"--nodes={nodes}",
        f"--ntasks-per-node={per_node}",
        f"--nodelist={where or ','.join(NODES[:nodes])}",
        *CPU,
        **{
            **job_env,
            "ENGINE": engine,
            "EPOCHS": str(epochs),
            "CHECKPOINT_EVERY": "",
            "EXTRA_ARGS": f"{SMALL} --max-steps {MAX_STEPS}",
            **env,
        },
    )


def job_dir(cluster, job_id: str) -> Path:
    return cluster.root / "runs" / f"resnet50_ba-{job_id}"


def finished(cluster, job_id: str, timeout: float = 300) -> Path:
    (task,) = cluster.wait(job_id, timeout=timeout)
    assert_completed(cluster, task, "resnet50_ba", job_id)
    return job_dir(cluster, job_id)


def model(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_node(cluster, job_env) -> dict[tuple[str, int], str]:
    """The one-node references, submitted at once; they run on n1 while the first test's n3 is down."""
    return {(engine, ranks): train(cluster, job_env, engine, 1, ranks) for engine, ranks in ONE_NODE}


def test_a_dead_node_requeues_the_job_which_resumes_to_the_same_model(cluster, job_env, request):
    """Every process of n3 (slurmd included) killed after the first checkpoint (step 2): SLURM notices
    the node failure, ends and requeues the job; n3 comes back cleaned, and the job resumes from the
    checkpoint and ends with the parameters of the uninterrupted run (two ranks on one node). The
    other tests' jobs start meanwhile, on n1 and n2."""
    job_id = train(cluster, job_env, "horovod", 2, 1, where="n1,n3", CHECKPOINT_EVERY="2")
    one_node = request.getfixturevalue("one_node")  # submitted after this job: they wait for none of its nodes
    folder = job_dir(cluster, job_id)
    first_checkpoint, deadline = folder / "checkpoints" / f"step-{2:09d}.pt", time.monotonic() + 180
    while not (first_checkpoint.exists() and last_logged_step(folder) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)  # in a step after the checkpoint: silence in a checkpoint is given three timeouts
    cluster.kill_node("n3")
    killed = time.monotonic()
    assert not records(folder, "summary"), "the run ended before the node was killed"
    request.getfixturevalue("two_node")  # the CPUs are free while SLURM waits for n3
    (task,) = cluster.wait(job_id, timeout=90, until=lambda tasks: tasks[0]["JobState"] != "RUNNING")
    ended = time.monotonic() - killed
    print(f"node n3 killed: the job left RUNNING {ended:.1f} s later ({task['JobState']})")  # pytest -s shows it
    assert ended < 60 and task["Restarts"] == "1", (ended, task)
    cluster.restart_node("n3")  # a rebooted node: cleaned, idle again
    (task,) = cluster.wait(job_id, timeout=300)
    assert_completed(cluster, task, "resnet50_ba", job_id)
    first, second = records(folder, "start")
    assert first["resumed_from"] is None and 2 <= second["resumed_from"] < EPOCHS * MAX_STEPS
    (summary,) = records(folder, "summary")
    assert summary["steps"] == EPOCHS * MAX_STEPS and summary["params_identical"]
    reference = finished(cluster, one_node["horovod", 2])
    assert summary["param_digests"] == records(reference, "summary")[0]["param_digests"]
    assert re.search(
        r"JOB \d+ ON n1 CANCELLED AT \S+ DUE TO NODE FAILURE", slurm_output(cluster, "resnet50_ba", job_id)
    )


@pytest.fixture(scope="module")
def two_node(cluster, job_env, demo_data) -> dict[str, str]:
    """Every two-node job of the tests below, submitted at once (while n3 is down): name -> job id."""
    jobs = {
        f"{engine} 2x{per_node}": train(cluster, job_env, engine, 2, per_node)
        for engine in ("horovod", "torch")
        for per_node in (1, 2)
    }
    # 2 x 1 ranks, a batch of views too big for any node: refused at set-up, per node.
    jobs["memory"] = train(cluster, job_env, "horovod", 2, 1, EXTRA_ARGS=f"{SMALL} --view-size 16384")
    jobs["scaling"] = submit(
        cluster,
        "scaling.sh",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--nodelist=n1,n2",
        *CPU,
        **job_env,
        RECIPE="pipelines/demo.toml",
        RANKS_LIST="1 2",
        VIEWS_LIST="1",
        STEPS="3",
        WARMUP="1",
        EXTRA_ARGS="--dali-threads 1 --torch-threads 1",
    )
    # The launch line of slurm/README.md: one torchrun agent per node, meeting at the first (c10d).
    script = cluster.root / "torchrun.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1 --nodelist=n1,n2 --cpus-per-task=1 --gpus-per-node=0
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
srun --kill-on-bad-exit=1 {sys.executable} -m torch.distributed.run --nnodes 2 --nproc-per-node 1 \\
    --rdzv-backend c10d --rdzv-endpoint "$head:$((29400 + SLURM_JOB_ID % 1000))" --rdzv-id "$SLURM_JOB_ID" \\
    -m dali_ba.train --recipe pipelines/demo.toml --train {demo_data}/train --val {demo_data}/val \\
    --output {cluster.root}/runs/torchrun --epochs 1 --max-steps 3 --batch-size 16 {SMALL}
""")
    jobs["torchrun"] = cluster.sbatch(f"--output={cluster.root}/torchrun-%j.out", str(script), env=job_env, cwd=REPO)
    # The doctor across both nodes, with data that only n1 has: a copy in n1's own TmpFS (the same path on
    # n2 is n2's TmpFS, without it), the output folder shared.
    shutil.copytree(demo_data, cluster.root / "n1" / "tmp" / "demo")
    local = cluster.root / "tmp" / "demo"
    jobs["doctor"] = cluster.sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        "--nodelist=n1,n2",
        *CPU,
        f"--output={cluster.root}/doctor-%j.out",
        "--wrap",
        f"srun --mpi=pmix {sys.executable} -m dali_ba.doctor --recipe pipelines/demo.toml --train {local}/train "
        f"--val {local}/val --output {cluster.root}/doctor/run --json {cluster.root}/doctor.json --dali-threads 1",
        env=job_env,
        cwd=REPO,
    )
    return jobs


@pytest.mark.parametrize("per_node", [1, 2])
def test_two_nodes_train_the_model_of_one_node_under_each_engine(cluster, one_node, two_node, per_node):
    """--nodes=2 with 1 and 2 ranks per node, Horovod and torch: every rank's host and place on its node
    in environment.json, parameters identical over ranks, and the model of as many ranks on one node."""
    ranks = 2 * per_node
    for engine in ("horovod", "torch"):
        reference = model(finished(cluster, one_node["horovod" if ranks == 2 else engine, ranks]))
        folder = finished(cluster, two_node[f"{engine} 2x{per_node}"])
        environment = json.loads((folder / "environment.json").read_text())
        assert environment["nodes"] == list(NODES) and environment["ranks"] == ranks
        for rank, place in enumerate(environment["per_rank"]):
            node, local = divmod(rank, per_node)  # srun's block distribution
            assert (place["rank"], place["host"], place["local_rank"], place["local_size"]) == (
                rank,
                NODES[node],
                local,
                per_node,
            ), place
            assert place["launcher_local_rank"] == local  # SLURM_LOCALID (torch) / Open MPI's local rank (Horovod)
            if engine == "horovod":
                assert (place["cross_rank"], place["cross_size"]) == (node, 2)
        (start,) = records(folder, "start")
        assert (start["engine"], start["ranks"]) == (engine, ranks)
        (summary,) = records(folder, "summary")
        assert summary["steps"] == EPOCHS * MAX_STEPS and summary["params_identical"]
        for name, tensor in model(folder).items():
            torch.testing.assert_close(
                tensor.float(),
                reference[name].float(),
                rtol=1e-4,
                atol=1e-5,
                msg=lambda text, name=name: f"{engine} 2x{per_node} vs 1x{ranks}: {name}: {text}",  # noqa: B023
            )


def test_the_memory_check_counts_the_ranks_of_one_node(cluster, two_node):
    """2 nodes x 1 rank with a batch of views too big for any node: the refusal counts the one rank of
    that node, not the 2 of the job."""
    job_id = two_node["memory"]
    (task,) = cluster.wait(job_id, timeout=300)
    output = slurm_output(cluster, "resnet50_ba", job_id)
    assert (task["JobState"], task["ExitCode"]) == ("FAILED", "2:0"), output[-3000:]
    (line,) = [line for line in output.splitlines() if "--view-size 16384" in line]
    assert "8 samples x M=2 views per rank" in line and "for 1 rank(s) on this node" in line, line
    # The job's status is the first failed rank's. Both ranks refuse at the same check, so either may
    # reach srun first; the line names that rank with its own node.
    assert re.search(
        r"batch: the training step failed \(exit 2\): rank (0 on node n1|1 on node n2) failed "
        r"\(Exited with exit code 2\)",
        output,
    ), output[-3000:]


def test_torchrun_under_srun_rendezvous_across_two_nodes(cluster, two_node):
    """srun starts one torchrun agent per node; they meet at the first node (c10d) and start a worker
    each: 2 ranks of the torch engine, as torchtitan launches on SLURM."""
    job_id = two_node["torchrun"]
    (task,) = cluster.wait(job_id, timeout=300)
    log = (cluster.root / f"torchrun-{job_id}.out").read_text()
    assert (task["JobState"], task["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    output = cluster.root / "runs" / "torchrun"
    (start,) = records(output, "start")
    assert (start["engine"], start["ranks"]) == ("torch", 2) and "started by torchrun" in start["engine_reason"]
    environment = json.loads((output / "environment.json").read_text())
    assert [(p["host"], p["local_rank"]) for p in environment["per_rank"]] == [("n1", 0), ("n2", 0)]
    (summary,) = records(output, "summary")
    assert summary["steps"] == 3 and summary["params_identical"]


def test_scaling_table_names_the_nodes_of_each_point(cluster, job_env, two_node):
    """slurm/scaling.sh on 2 nodes x 1 rank: the 1-rank point runs on one node, the 2-rank one on both."""
    job_id = two_node["scaling"]
    (task,) = cluster.wait(job_id, timeout=300)
    assert_completed(cluster, task, "scaling", job_id)
    table = (cluster.root / "runs" / f"scaling-{job_id}" / "scaling.md").read_text().splitlines()
    assert table[0].startswith("| nodes | ranks |")
    assert [[cell.strip() for cell in row.split("|")[1:3]] for row in table[2:]] == [["n1", "1"], ["n1,n2", "2"]]


def test_the_doctor_names_the_node_that_cannot_see_the_data(cluster, two_node):
    """srun --mpi=pmix of the doctor on n1 and n2: one table, a row per node; the data readable on n1
    only, so a failure naming n2 and rank 1 (and a non-zero status); the output folder shared by both."""
    job_id = two_node["doctor"]
    (task,) = cluster.wait(job_id, timeout=300)
    log = (cluster.root / f"doctor-{job_id}.out").read_text()
    assert task["JobState"] == "FAILED", log[-3000:]
    report = json.loads((cluster.root / "doctor.json").read_text())
    assert not report["ok"] and report["ranks"] == 2 and sorted(report["nodes"]) == list(NODES), log[-3000:]
    assert report["nodes"]["n1"]["data"]["train"]["readable"] is True
    assert report["nodes"]["n2"]["data"]["train"]["readable"] is False
    assert report["nodes"]["n1"]["output"]["shared"] and report["nodes"]["n2"]["output"]["shared"]
    failures = [p for p in report["problems"] if p["level"] == "fail"]
    assert [(p["check"], p["nodes"], p["ranks"]) for p in failures] == [("data", ["n2"], [1])] * 2, failures
    assert "--train" in failures[0]["text"] and "--val" in failures[1]["text"]
    assert [row[0] for row in report["table"][1:]] == list(NODES)
    assert log.count("FAIL  n2 (rank 1)  data: --train") == 1  # rank 0 alone reports
    assert not (cluster.root / "doctor" / "run").exists()  # what it created to test, removed


@pytest.fixture(scope="module")
def long_runs(cluster, job_env, two_node) -> dict[str, str]:
    """A long 2 x 1 training per engine, both at once (each is killed well before its end)."""
    for job_id in two_node.values():  # the CPUs to these two
        cluster.wait(job_id, timeout=300)
    return {engine: train(cluster, job_env, engine, 2, 1, epochs=100) for engine in ("horovod", "torch")}


@pytest.mark.parametrize("engine", ["horovod", "torch"])
def test_a_killed_rank_ends_every_rank_within_a_minute(cluster, long_runs, engine):
    """kill -9 of the rank on n2: srun --kill-on-bad-exit ends the rank on n1 too (Horovod over MPI
    would wait in its allreduce), and the job's log names the rank and node that died."""
    job_id = long_runs[engine]
    folder = job_dir(cluster, job_id)
    cluster.wait(
        job_id,
        timeout=120,
        until=lambda tasks: len(records(folder, "step")) >= 2 or tasks[0]["JobState"] not in ("PENDING", "RUNNING"),
    )
    ranks = cluster.task_processes(job_id, "dali_ba.train")
    victims = [pid for pid, node in ranks.items() if node == "n2"]
    assert sorted(ranks.values()) == ["n1", "n2"] and len(victims) == 1, ranks
    subprocess.run(["kill", "-9", str(victims[0])], check=True)
    killed = time.monotonic()
    while cluster.task_processes(job_id, "dali_ba.train") and time.monotonic() - killed < 90:
        time.sleep(0.2)
    gone = time.monotonic() - killed
    print(f"{engine}: every rank gone {gone:.1f} s after kill -9 of rank 1")  # pytest -s shows it
    (task,) = cluster.wait(job_id, timeout=60)
    output = slurm_output(cluster, "resnet50_ba", job_id)
    assert gone < 60, f"ranks still running {gone:.0f} s after the kill:\n{output[-2000:]}"
    assert task["JobState"] == "FAILED", output[-2000:]
    assert "batch: the training step failed (exit 137): rank 1 on node n2 failed (Killed)" in output, output[-3000:]
    assert "Traceback" not in output  # the survivor's one line, not a traceback


def test_a_stalled_rank_on_the_second_node_ends_the_job_which_is_requeued_and_resumes(
    cluster, job_env, long_runs, one_node
):
    """SIGSTOP of the rank on the second node in a step after the first checkpoint (--stall-timeout 15):
    the job ends within 45 s (75 s if it stopped in the next checkpoint) with the stall line naming rank 1
    and its node, slurm/lib.sh requeues it, and the job resumes to the model of the uninterrupted run."""
    for job_id in long_runs.values():  # the nodes to this job alone
        cluster.wait(job_id, timeout=120)
    job_id = submit(
        cluster,
        "resnet50_ba.sh",
        "--nodes=2",
        "--ntasks-per-node=1",
        *CPU,
        **{
            **job_env,
            "ENGINE": "horovod",
            "EPOCHS": str(EPOCHS),
            "CHECKPOINT_EVERY": "2",
            "EXTRA_ARGS": f"{SMALL} --max-steps {MAX_STEPS} --stall-timeout 15",
        },
    )
    folder = job_dir(cluster, job_id)
    first_checkpoint, deadline = folder / "checkpoints" / f"step-{2:09d}.pt", time.monotonic() + 180
    while not (first_checkpoint.exists() and last_logged_step(folder) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)  # in a step after the checkpoint: silence in a checkpoint is given three timeouts
    ranks = cluster.task_processes(job_id, "dali_ba.train")
    batch_host = cluster.job(job_id)[0]["BatchHost"]  # rank 0's node
    second = [(pid, n) for pid, n in ranks.items() if n != batch_host]
    assert len(ranks) == 2 and len(second) == 1 and not records(folder, "summary"), (ranks, batch_host)
    ((stalled, node),) = second
    subprocess.run(["kill", "-STOP", str(stalled)], check=True)
    stopped = time.monotonic()
    (task,) = cluster.wait(job_id, timeout=120, until=lambda tasks: tasks[0]["JobState"] != "RUNNING")
    ended = time.monotonic() - stopped
    print(f"rank 1 stopped on {node}: the job left RUNNING {ended:.1f} s later ({task['JobState']})")
    (task,) = cluster.wait(job_id, timeout=300)
    output = slurm_output(cluster, "resnet50_ba", job_id)
    paused = re.search(r"rank 1 \(node [^)]*\) silent for \d+ s [^;]*last seen in checkpoint", output)
    assert ended < (3 if paused else 1) * 15 + 30, output[-3000:]
    assert_completed(cluster, task, "resnet50_ba", job_id)
    assert task["Restarts"] == "1"
    assert re.search(rf"stalled \(--stall-timeout 15\): rank 1 \(node {node}\) silent for \d+ s", output), output[
        -3000:
    ]
    assert (
        f"batch: a rank stalled (exit 76) on {node}; requeueing job {job_id} (stall 1 of at most 2 requeued)" in output
    )
    assert re.search(rf"stalled with exit 76 on {node}; requeued", (folder / "job.txt").read_text())
    first, second = records(folder, "start")
    assert second["resumed_from"] >= 2
    (summary,) = records(folder, "summary")
    reference = finished(cluster, one_node["horovod", 2])
    assert summary["param_digests"] == records(reference, "summary")[0]["param_digests"]
