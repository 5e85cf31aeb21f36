"""What the SLURM test modules share: a module's cluster (started, kept logs on failure, stopped),
submitting a template from slurm/, and reading a job's records and output."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, keep_output
from slurm_cluster import ClusterError, SlurmCluster

# CPU versions of the templates: tiny model and views, one DALI and torch thread per rank.
SMALL = "--arch resnet20 --view-size 32 --val-resize 36 --val-crop 32 --dali-threads 1 --torch-threads 1 --log-every 1"


def running_cluster(request, **options):
    """Generator for a module fixture: a started SlurmCluster in a fresh folder; on a failed test of the
    module its daemon logs and job outputs are kept under runs/slurm-test-logs/. Never skipped: a
    cluster that cannot start fails the tests with the reason."""
    # Not pytest's tmp_path: its parents are private to root, and munged runs as user munge.
    root = Path(tempfile.mkdtemp(prefix="dali-ba-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root, **options)
    failed_before = request.session.testsfailed
    try:
        failure = None
        try:
            cluster.start()
        except ClusterError as exc:
            failure = str(exc)
        if failure:
            pytest.fail(failure, pytrace=False)
        yield cluster
    finally:
        cluster.stop()
        if request.session.testsfailed > failed_before:  # keep what explains the failure
            kept = cluster.keep_logs(REPO / "runs" / "slurm-test-logs" / root.name)
            sys.__stderr__.write(
                f"\n{request.module.__name__}: a test failed; SLURM daemon logs and job outputs kept in {kept}\n"
            )
        shutil.rmtree(root, ignore_errors=True)


def job_environment(cluster: SlurmCluster, data: Path) -> dict[str, str]:
    """Overrides every job gets: the data, this Python, outputs under the cluster's folder."""
    return {
        "DATA": str(data / "train"),
        "VAL": str(data / "val"),
        "OUTPUT_ROOT": str(cluster.root / "runs"),
        "PYTHON": sys.executable,
        "DALI_BA_ROOT": str(REPO),
        "OMPI_MCA_mpi_yield_when_idle": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "BATCH": "16",
        "VIEWS": "2",
    }


def submit(slurm, template: str, *options: str, **env: str) -> str:
    """sbatch slurm/<template> with the environment overrides; SLURM's output: <root>/<name>-<job id>.out."""
    name = "%x-%A_%a.out" if any(o.startswith("--array") for o in options) else "%x-%j.out"
    return slurm.sbatch(*options, f"--output={slurm.root}/{name}", f"slurm/{template}", env=env, cwd=REPO)


def records(job_dir: Path, kind: str | None = None) -> list[dict]:
    path = job_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if kind is None or r["kind"] == kind]


def slurm_output(slurm, job_name: str, job_id: str) -> str:
    return (slurm.root / f"{job_name}-{job_id}.out").read_text()


def assert_completed(slurm, task: dict, name: str, job_id: str) -> None:
    if (task["JobState"], task["ExitCode"]) == ("COMPLETED", "0:0"):
        return
    output = slurm_output(slurm, name, job_id)
    kept = keep_output([f"{name}-{job_id}.out"], output, "")  # the whole job output (a rank's stack is long)
    errors = [line for line in output.splitlines() if "error" in line.lower() or "Traceback" in line][:30]
    raise AssertionError(
        f"job {job_id} ended {task['JobState']} {task['ExitCode']}; whole output: {kept}\n--- its error lines:\n"
        + "\n".join(errors)
        + f"\n--- its end:\n{output[-3000:]}\n--- slurmctld:\n{slurm._tail('slurmctld', 20)}\n"
        + "".join(f"--- slurmd of {node}:\n{slurm._tail(node, 30)}\n" for node in slurm.nodes)
    )
