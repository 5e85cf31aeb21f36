"""launch/slurm_hosts.py: SLURM's compressed node lists and task counts as a horovodrun/mpirun -H list."""

import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "launch"))
from slurm_hosts import expand_nodelist, expand_tasks_per_node, main


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("vm", ["vm"]),
        ("node[01-03,07],gpu-a1", ["node01", "node02", "node03", "node07", "gpu-a1"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]-n[1,3]", ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]),
        ("a,b[5],c", ["a", "b5", "c"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist, message",
    [
        ("node[01-03", "unclosed"),
        ("node01]", "unbalanced"),
        ("node[3-1]", "backwards"),
        ("node[a-b]", "bad range 'a-b'"),
        ("a,,b", "empty name"),
    ],
)
def test_bad_nodelist(nodelist, message):
    with pytest.raises(ValueError, match=message):
        expand_nodelist(nodelist)


def test_tasks_per_node():
    assert expand_tasks_per_node("4(x3),2", 4) == [4, 4, 4, 2]
    with pytest.raises(ValueError, match="gives 2 node"):
        expand_tasks_per_node("4(x2)", 3)


def test_cli_uses_the_allocation(monkeypatch, capsys):
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")  # scontrol (if any) cannot answer: Python expands
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[1-3]")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2),1")
    assert main([]) == 0
    assert capsys.readouterr().out.strip() == "gpu1:4,gpu2:4,gpu3:1"
    assert main(["x[1-2]", "--slots", "8"]) == 0
    assert capsys.readouterr().out.strip() == "x1:8,x2:8"


def test_cli_errors_name_the_problem():
    for args, message in [
        ([], "no node list"),
        (["n[1-2", "--slots", "1"], "unclosed '\\['"),
        (["n1", "--slots", "0"], "--slots must be >= 1"),
    ]:
        done = subprocess.run(
            [sys.executable, "launch/slurm_hosts.py", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "SLURM_CONF": "/nonexistent/slurm.conf"},
        )
        assert done.returncode == 2
        assert "slurm_hosts.py: error:" in done.stderr
        assert __import__("re").search(message, done.stderr), done.stderr
