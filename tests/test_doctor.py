"""python -m dali_ba.doctor: alone, under mpirun (2 ranks, one of them on a "node" that cannot see the data
or the output folder), under torchrun, with a rank that never reports; each rule on stand-ins of what this
CPU machine lacks (a driver, GPUs, old torch, a Horovod built without MPI)."""

import json
import os
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_cli

from dali_ba.doctor import main, versions
from dali_ba.doctor import node as doctor  # the per-rank checks
from dali_ba.doctor.findings import Findings, Problem
from dali_ba.doctor.verdict import judge, merge
from dali_ba.doctor.versions import requirement_floors
from dali_ba.recipe import Recipe

PY = sys.executable
DOCTOR = [PY, "-m", "dali_ba.doctor"]
MPIRUN = ["mpirun", "--oversubscribe", *(["--allow-run-as-root"] if os.geteuid() == 0 else [])]
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def flags(demo_data, output, report, *extra):
    return [
        "--recipe",
        "demo",
        "--train",
        str(demo_data / "train"),
        "--val",
        str(demo_data / "val"),
        "--output",
        str(output),
        "--json",
        str(report),
        *extra,
    ]


def problems(report: Path, level: str | None = None) -> dict[str, Problem]:
    """The report's problems by check (one per check in these tests)."""
    found = [Problem(**p) for p in json.loads(report.read_text())["problems"]]
    return {p.check: p for p in found if level is None or p.level == level}


# Alone -------------------------------------------------------------------------------------------------


def test_alone_on_good_data_finds_nothing_that_would_stop_a_run(demo_data, tmp_path, capsys):
    output, report = tmp_path / "new" / "run", tmp_path / "doctor.json"
    assert main(flags(demo_data, output, report)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("dali-ba doctor: 1 rank on 1 node; --engine auto -> none (one process")
    header = next(line for line in lines if line.startswith("node "))
    for column in (
        "python",
        "torch",
        "torchvision",
        "DALI",
        "driver",
        "device",
        "Horovod",
        "engine",
        "MPI",
        "cores/rank",
        "train",
        "val",
        "output",
    ):
        assert column in header.split()
    assert lines[-1] == "doctor: nothing found that would stop a run"
    document = json.loads(report.read_text())
    assert document["ok"] and document["exit_status"] == 0 and not problems(report, "fail")
    (node,) = document["nodes"].values()
    assert node["data"]["train"]["samples"] == 240 and node["data"]["val"]["samples"] == 60
    assert node["data"]["train"]["decoded_by"] == "DALI cpu" and node["data"]["train"]["shape"][2] == 3
    assert node["output"]["writable"] and node["output"]["shared"]
    (rank,) = document["per_rank"]
    assert rank["torch"] == torch.__version__ and rank["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert rank["dali"]["importable"] and rank["engine"]["engine"] == "none" and rank["horovod"]["mpi"]
    assert rank["floors"]["torch"] == "2.4" and rank["mpi"].startswith("Open MPI")
    assert not (tmp_path / "new").exists()  # the folders it made to try writing are gone again


def test_alone_names_missing_data_an_unwritable_output_and_a_run_in_the_way(demo_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    report = tmp_path / "doctor.json"
    status = main(
        [
            "--train",
            str(tmp_path / "nowhere"),
            "--val",
            str(demo_data / "val"),
            "--output",
            str(blocker / "run"),
            "--json",
            str(report),
        ]
    )
    assert status == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2 and out.splitlines()[-1].startswith("doctor: 2 problems would stop a run")
    found = problems(report, "fail")
    assert f"--train {tmp_path / 'nowhere'}: data directory not found" in found["data"].text
    assert "make the data readable at this path on every node" in found["data"].text
    assert f"--output {blocker / 'run'}: cannot create or write it here" in found["output"].text
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "start"}\n')
    assert main(["--output", str(run), "--json", str(report)]) == 1
    assert "already holds a run" in problems(report, "fail")["output"].text
    assert main(["--output", str(run), "--resume", "auto", "--json", str(report)]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]  # its marker file removed


def test_the_memory_check_counts_the_models_own_parameters(demo_data, tmp_path, monkeypatch, capsys):
    """Memory that holds the demo's batches of views and resnet20 (0.27 M parameters) but not vgg16_cifar
    (33.6 M): the count comes from the model the flag names, built on torch's meta device."""
    from dali_ba.recipe import load_recipe
    from dali_ba.training import checks

    d = load_recipe(REPO / "pipelines" / "demo.toml").data
    views = d.batch_size * d.views * d.view_size**2 * 3 * checks.BATCH_COPIES
    monkeypatch.setattr(checks, "_available_memory", lambda: views + (100 << 20))
    report = tmp_path / "doctor.json"
    assert main(flags(demo_data, tmp_path / "run", report, "--arch", "resnet20")) == 0
    assert main(flags(demo_data, tmp_path / "run", report, "--arch", "vgg16_cifar")) == 1
    text = problems(report, "fail")["data"].text
    assert "the model's 33.6 M parameters (513.4 MiB with gradients, momentum and the all-reduce buffer)" in text
    assert "more than the" in text and "\n" not in text
    capsys.readouterr()


def test_bad_flags_and_a_missing_recipe_are_one_line(tmp_path, capsys):
    assert main(["--recipe", "no-such-recipe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m dali_ba.doctor: error: recipe not found: no-such-recipe") and "\n" not in err
    assert main(["--json", str(tmp_path / "missing" / "d.json")]) == 2
    assert "--json" in capsys.readouterr().err
    done = run_cli(*DOCTOR, "--no-such-flag", timeout=60)
    assert done.returncode == 2 and "unrecognized arguments: --no-such-flag" in done.stderr
    assert "Traceback" not in done.stderr


# Under launchers ----------------------------------------------------------------------------------------


def test_mpirun_two_ranks_report_the_horovod_engine_in_one_table(demo_data, tmp_path):
    report = tmp_path / "doctor.json"
    done = run_cli(*MPIRUN, "-np", "2", *DOCTOR, *flags(demo_data, tmp_path / "run", report), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("dali-ba doctor:") == 1  # rank 0 alone prints
    assert "2 ranks on 1 node; --engine auto -> horovod (started by an MPI launcher" in done.stdout
    document = json.loads(report.read_text())
    assert document["ok"] and len(document["per_rank"]) == 2 and len(document["nodes"]) == 1
    rows = document["table"][1:]
    assert len(rows) == 1 and rows[0][:2] == [document["per_rank"][0]["host"], "0-1"]  # ranks alike: one row
    for rank in document["per_rank"]:
        assert rank["engine"]["engine"] == "horovod" and rank["horovod"]["mpi"] and rank["mpi"].startswith("Open MPI")
    assert [r["first_on_node"] for r in document["per_rank"]] == [True, False]


def test_a_node_that_cannot_see_the_data_or_the_output_folder_is_named(demo_data, tmp_path):
    """Rank 1 runs as host n2 in its own mount namespace, where the data folder and the output's parent
    are empty tmpfs mounts: a second node without the data and with a node-local output disk."""
    report, shared = tmp_path / "doctor.json", tmp_path / "shared"
    shared.mkdir()
    args = flags(demo_data, shared / "run", report)
    hide = (
        f"hostname n2 && mount -t tmpfs none {demo_data} && mount -t tmpfs none {shared} && "
        f"exec {' '.join([*DOCTOR, *args])}"
    )
    done = run_cli(
        *MPIRUN,
        "-np",
        "1",
        *DOCTOR,
        *args,
        ":",
        "-np",
        "1",
        "unshare",
        "--uts",
        "--mount",
        "sh",
        "-c",
        hide,
        timeout=300,
    )
    assert done.returncode != 0, done.stdout[-3000:]
    document = json.loads(report.read_text())
    assert not document["ok"] and set(document["nodes"]) == {document["per_rank"][0]["host"], "n2"}
    assert document["nodes"]["n2"]["data"]["train"]["readable"] is False
    assert document["nodes"]["n2"]["output"]["shared"] is False
    found = problems(report, "fail")
    assert found["data"].nodes == ["n2"] and found["data"].ranks == [1]
    assert "data directory not found" in found["data"].text
    assert found["output"].nodes == ["n2"] and "not the folder rank 0 writes" in found["output"].text
    assert [row[0] for row in document["table"][1:]] == [document["per_rank"][0]["host"], "n2"]
    lines = done.stdout.splitlines()
    assert any(line.startswith("FAIL  n2 (rank 1)  data: --train") for line in lines)
    assert not (shared / "run").exists()


def test_a_rank_that_never_reports_is_named_and_the_job_ends(tmp_path):
    report = tmp_path / "doctor.json"
    sleeper = [PY, "-c", "from mpi4py import MPI; import time; time.sleep(120)"]  # in MPI, never in the doctor
    done = run_cli(
        *MPIRUN, "-np", "1", *DOCTOR, "--timeout", "3", "--json", str(report), ":", "-np", "1", *sleeper, timeout=120
    )
    assert done.returncode != 0
    found = problems(report, "fail")
    assert found["ranks"].ranks == [1] and "did not report within --timeout" in found["ranks"].text
    assert "rank 1 did not report" in done.stdout


def test_under_torchrun_a_rank_that_never_reports_is_named_too(tmp_path):
    """torchrun's second worker sleeps instead of starting the doctor: rank 0 names it after --timeout
    (through torchrun's own store), fails, and torchrun ends the sleeper."""
    report = tmp_path / "doctor.json"
    worker = (
        f'if [ "$RANK" = 1 ]; then exec sleep 120; else exec {PY} -m dali_ba.doctor --timeout 5 --json {report}; fi'
    )
    started = time.monotonic()
    done = run_cli(*TORCHRUN, "--no-python", "sh", "-c", worker, timeout=180)
    assert done.returncode != 0 and time.monotonic() - started < 120
    found = problems(report, "fail")
    assert found["ranks"].ranks == [1] and "did not report within --timeout" in found["ranks"].text
    assert "rank 1 did not report" in done.stdout


def test_torchrun_two_workers_report_the_torch_engine(tmp_path):
    report = tmp_path / "doctor.json"
    done = run_cli(*TORCHRUN, "-m", "dali_ba.doctor", "--json", str(report), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 ranks on 1 node; --engine auto -> torch (started by torchrun" in done.stdout
    document = json.loads(report.read_text())
    assert [r["engine"]["engine"] for r in document["per_rank"]] == ["torch", "torch"]
    assert all(r["torch_backends"]["gloo"] for r in document["per_rank"])


# Each rule, on stand-ins ---------------------------------------------------------------------------------


def test_the_supported_versions_come_from_setup_cfg():
    floors = requirement_floors()
    assert (floors["python"], floors["torch"], floors["torchvision"], floors["horovod"]) == (
        (3, 11),
        (2, 4),
        (0, 19),
        (0, 28),
    )
    text = (REPO / "setup.cfg").read_text()
    assert "torch>=2.4" in text and "torchvision>=0.19" in text and "python_requires = >=3.11" in text


def test_an_installed_copy_reads_the_same_floors_from_its_metadata(monkeypatch):
    """A wheel has no setup.cfg beside it: the package metadata, written from setup.cfg, says the same."""
    expected = requirement_floors()
    monkeypatch.setattr(versions, "REPO_SETUP", Path("/nonexistent/setup.cfg"))
    assert requirement_floors() == expected


def test_a_torch_older_than_the_floor_fails(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.3.1+cu121")
    monkeypatch.setitem(sys.modules, "torchvision", SimpleNamespace(__version__="0.18.1"))
    found = Findings(0, "n1")
    assert doctor.check_torch(found, requirement_floors())
    texts = [p.text for p in found.problems if p.level == "fail"]
    assert texts == [
        "torch 2.3.1+cu121 is older than 2.4, the oldest dali-ba supports — install torch>=2.4",
        "torchvision 0.18.1 is older than 0.19, the oldest dali-ba supports — install torchvision>=0.19",
    ]


def test_the_gradient_norm_needs_no_get_total_norm():
    """torch.nn.utils.get_total_norm is torch 2.6's; the floor is 2.4: the fallback gives the same norm."""
    from dali_ba.training.step import gradient_norm

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model(torch.ones(4, 3)).sum().backward()
    newest = float(gradient_norm(model))  # a 0-d tensor, left on the device
    with pytest.MonkeyPatch.context() as patch:
        patch.delattr(torch.nn.utils, "get_total_norm", raising=False)
        assert not hasattr(torch.nn.utils, "get_total_norm")
        assert float(gradient_norm(model)) == pytest.approx(newest, rel=1e-6) and newest > 0


def test_builds_for_a_newer_cuda_than_the_driver_fail_with_what_to_install(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    found = Findings(0, "n1")
    doctor.check_gpu(found, "550.54.15", 0, Recipe())
    doctor.check_dali(found, "550.54.15", None)
    gpu, dali = (p for p in found.problems if p.level == "fail")
    assert "built for CUDA 13.0, which needs NVIDIA driver >= 580, and this node has 550.54.15" in gpu.text
    assert "built for CUDA 13, which needs NVIDIA driver >= 580, and this node has 550.54.15" in dali.text
    assert "pip uninstall -y nvidia-dali-cuda130 && pip install nvidia-dali-cuda120==2.4.0" in dali.text
    too_old = Findings(0, "n1")
    doctor.check_dali(too_old, "470.82.01", None)
    assert "older than 525.60" in too_old.problems[0].text


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes a driver on a machine without a GPU")
@pytest.mark.parametrize(
    "driver, status, lines",
    [
        (
            "550.54.15",
            1,
            [
                "FAIL  {host} (rank 0)  gpu: torch {torch} is built for CUDA 13.0, which needs NVIDIA driver >= 580",
                "FAIL  {host} (rank 0)  dali: nvidia-dali-cuda130 2.4.0 is built for CUDA 13, which needs NVIDIA "
                "driver >= 580, and this node has 550.54.15 — pip uninstall -y nvidia-dali-cuda130 && pip install "
                "nvidia-dali-cuda120==2.4.0",
            ],
        ),
        ("580.65.06", 0, ["WARN  {host} (rank 0)  gpu: nvidia-smi finds a GPU but torch sees none"]),
    ],
)
def test_the_doctor_judges_the_builds_by_the_driver_nvidia_smi_reports(
    monkeypatch, tmp_path, capsys, driver, status, lines
):
    """A fake nvidia-smi first on PATH: the same rule as launch/install.sh (tests/test_install_choice.py)."""
    if torch.version.cuda is None or not torch.version.cuda.startswith("13"):
        pytest.skip("expects this project's CUDA 13 torch")
    (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\necho {driver}\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert main(["--dali-threads", "1"]) == status
    out = capsys.readouterr().out
    for line in lines:
        assert line.format(host=socket.gethostname(), torch=torch.__version__) in out


@pytest.mark.parametrize("hardware, warned", [((True, ""), False), ((False, "decoded nothing"), True)])
def test_no_hardware_jpeg_decoder_is_a_warning(monkeypatch, hardware, warned):
    monkeypatch.setattr(doctor, "hardware_jpeg", lambda index: hardware)
    found = Findings(0, "n1")
    doctor.check_dali(found, "580.65.06", 0)
    assert found.facts["dali"]["hardware_jpeg"] is hardware[0]
    assert [p.level for p in found.problems] == (["warn"] if warned else [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the probe's answer on a GPU depends on the GPU")
def test_the_hardware_decoder_probe_says_no_without_a_gpu():
    available, reason = doctor.hardware_jpeg(0)
    assert available is False and reason


def test_a_hardware_decoder_probe_that_never_answers_is_killed_and_says_where_it_hung(tmp_path, monkeypatch):
    """The probe runs in a child under a limit, so a hardware backend that never answers cannot hang the
    doctor. Here a stand-in nvImageCodec that sleeps forever."""
    fake = tmp_path / "nvidia"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "nvimgcodec.py").write_text(
        "import time\n"
        "class BackendKind:\n    HW_GPU_ONLY = CPU_ONLY = 0\n"
        "def Backend(kind):\n    return kind\n"
        "class Decoder:\n    def __init__(self, **options):\n        time.sleep(600)\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{REPO}")
    started = time.monotonic()
    available, reason = doctor.hardware_jpeg(0, timeout=4)
    assert time.monotonic() - started < 30  # killed at its limit, not after the sleep
    assert available is False
    assert reason.startswith("nvImageCodec gave no answer in 4 s (stuck at File ") and "nvimgcodec.py" in reason
    found = Findings(0, "n1")
    monkeypatch.setattr(doctor, "hardware_jpeg", lambda index: (False, reason))
    doctor.check_dali(found, "580.65.06", 0)
    (problem,) = found.problems
    assert problem.level == "warn" and "nvImageCodec gave no answer in 4 s" in problem.text


HOROVOD = {"installed": True, "version": "0.28.1", "mpi": True, "gloo": True, "nccl": True, "cuda": True}
MPI_ENV = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
GLOO_ENV = {"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"}
TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29400"}


@pytest.mark.parametrize(
    "env, horovod, works, device, backends, expected",
    [
        (MPI_ENV, HOROVOD, True, "cpu", {}, None),
        (MPI_ENV, {**HOROVOD, "mpi": False}, True, "cpu", {}, ("fail", "built without MPI")),
        (GLOO_ENV, {**HOROVOD, "gloo": False}, True, "cpu", {}, ("fail", "built without Gloo")),
        (MPI_ENV, {**HOROVOD, "nccl": False}, True, "cuda:0", {}, ("warn", "built without NCCL")),
        (
            MPI_ENV,
            {"installed": True, "error": "undefined symbol"},
            False,
            "cpu",
            {},
            ("fail", "import horovod.torch fails"),
        ),
        (MPI_ENV, {"installed": False}, False, "cpu", {}, ("fail", "Horovod is not installed")),
        (TORCHRUN_ENV, {"installed": False}, False, "cuda:0", {"nccl": False, "gloo": True}, ("fail", "NCCL backend")),
        (TORCHRUN_ENV, {"installed": False}, False, "cpu", {"nccl": False, "gloo": True}, None),
    ],
)
def test_the_engine_this_launcher_gets_and_what_it_needs(monkeypatch, env, horovod, works, device, backends, expected):
    for name in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "HOROVOD_RANK", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("dali_ba.distributed.launcher.horovod_importable", lambda: horovod["installed"])
    found = Findings(0, "n1")
    found.facts.update(horovod=horovod, torch_backends=backends)
    doctor.check_engine(found, Recipe(), works, device)
    got = [(p.level, p.text) for p in found.problems]
    assert (
        (got == []) if expected is None else (len(got) == 1 and got[0][0] == expected[0] and expected[1] in got[0][1])
    )


def rank(number, host, **facts):
    """A rank's findings as judge() receives them."""
    return {
        "rank": number,
        "host": host,
        "local_size": 2,
        "first_on_node": number % 2 == 0,
        "python": "3.11.7",
        "torch": "2.14.1",
        "torchvision": "0.29.1",
        "dali_ba": "0.2.0",
        "device": "cpu",
        "cpus": [0, 1, 2, 3, 4, 5, 6, 7],
        "problems": [],
        **facts,
    }


def test_what_only_the_whole_job_shows():
    recipe = Recipe()
    recipe.data.dali_threads = 4
    ranks = [
        rank(0, "n1", device="cuda:0", gpu_index=0, gpu_uuid="GPU-a", visible_gpus=1),
        rank(1, "n1", device="cuda:0", gpu_index=0, gpu_uuid="GPU-a", visible_gpus=1),
        rank(2, "n2", torch="2.11.0", cpus=[0]),
        rank(3, "n2", torch="2.11.0", cpus=[1]),
    ]
    every = judge(ranks, recipe, ["n1", "n1", "n2", "n2"])
    found = {p.check: p for p in every}
    assert found["versions"].level == "fail" and found["versions"].nodes == ["n2"]
    assert "torch differs between ranks (2.14.1 on n1, 2.11.0 on n2)" in found["versions"].text
    no_gpu, shared = (p for p in every if p.check == "gpu")
    assert no_gpu.text.startswith("some ranks see no GPU while others train on one") and no_gpu.ranks == [2, 3]
    assert "ranks 0 and 1 on host n1 would share one GPU" in shared.text and shared.ranks == [0, 1]
    assert found["cores"].level == "warn" and found["cores"].nodes == ["n2"] and found["cores"].ranks == [2, 3]
    assert "1 core per rank for --dali-threads 4" in found["cores"].text


def test_the_same_problem_on_many_ranks_is_one_line():
    merged = merge(
        [
            Problem("warn", "cores", "few cores", [1], ["n1"]),
            Problem("fail", "data", "no data", [2], ["n2"]),
            Problem("warn", "cores", "few cores", [0], ["n1"]),
            Problem("warn", "cores", "few cores", [3], ["n2"]),
        ]
    )
    assert [(p.level, p.ranks, p.nodes) for p in merged] == [("fail", [2], ["n2"]), ("warn", [0, 1, 3], ["n1", "n2"])]


def test_dali_older_than_the_floor_fails(monkeypatch, capsys):
    """A DALI before 1.44 has no dynamic executor (exec_dynamic) to ask for: a stand-in 1.43 is a FAIL line."""
    import nvidia.dali

    from dali_ba.install_choice import MIN_DALI, DaliBuild, version_tuple

    assert MIN_DALI == "1.44"
    assert requirement_floors()["nvidia-dali-cuda120"] == requirement_floors()["nvidia-dali-cuda130"] == (1, 44)
    assert "nvidia-dali-cuda120>=1.44" in (REPO / "setup.cfg").read_text()
    found = Findings(0, "n1")
    doctor.check_dali(found, None, None)
    assert not found.problems and version_tuple(found.facts["dali"]["version"]) >= (1, 44)  # the DALI installed
    monkeypatch.setattr(nvidia.dali, "__version__", "1.43.0")
    monkeypatch.setattr(doctor, "installed_dali", lambda: DaliBuild("nvidia-dali-cuda120", "1.43.0", 12))
    found = Findings(0, "n1")
    doctor.check_dali(found, "550.54.15", None)
    assert [(p.level, p.text) for p in found.problems] == [
        (
            "fail",
            "nvidia-dali-cuda120 1.43.0 is older than 1.44, the oldest dali-ba supports (its graphs need the "
            "dynamic executor, exec_dynamic) — pip install nvidia-dali-cuda120==2.4.0 (bash launch/install.sh "
            "picks the build for the driver)",
        )
    ]
    assert main(["--dali-threads", "1"]) == 1
    assert (
        f"FAIL  {socket.gethostname()} (rank 0)  dali: nvidia-dali-cuda120 1.43.0 is older than 1.44"
        in capsys.readouterr().out
    )
