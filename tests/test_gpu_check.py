"""make gpu-check: the GPU check's every step run on the CPU at tiny sizes (SMOKE=1), so that the script
works the first time a GPU machine is lent; and its driver's handling of failing and hanging steps."""

import json
import os
import sys
import tarfile
import textwrap
import time

import psutil
import pytest
from conftest import run_cli

from benchmarks.gpu_check import driver
from benchmarks.gpu_check import report as gpu_report
from benchmarks.gpu_check.steps_env import JpgUtilisation, nvidia_smi
from benchmarks.gpu_check.steps_tests import OWN_TEST, SMOKE_FILES, SMOKE_TESTS, marked_files, read_outcomes

pytestmark = [
    pytest.mark.strict_device,  # the smoke run belongs to make test's strict-device pass
    pytest.mark.timeout(1800),  # as long as its command may take (the suite's 900 s is for one test)
]

STEPS = ("env", "doctor", "tests", "demo", "loader", "figure5", "compile", "views", "augment")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    # ~3-4 min on 2 cores; a first torch.compile on the machine (inductor's cache cold) adds ~2 min
    done = run_cli("make", "-s", "gpu-check", "SMOKE=1", f"OUT={out}", timeout=1800)
    return done, out


def test_the_smoke_run_goes_through_every_step(smoke):
    done, out = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["smoke"] and "SMOKE RUN" in report["note"]
    assert [(s["name"], s["status"]) for s in report["steps"]] == [(name, "ok") for name in STEPS]
    assert sorted(p.name for p in out.iterdir()) == ["details.tar.gz", "gpu_check.json", "gpu_check.md"]  # <= 8
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["torch"] and machine["dali"] and machine["gpu"] == "no GPU"
    md = (out / "gpu_check.md").read_text()
    assert "SMOKE RUN" in md and "| env | " in md and "## Targets" in md
    assert md.count("| not measured | unmeasured on the CPU: needs a GPU; from loader |") == 2  # the two facts


def test_the_smoke_run_has_the_numbers_of_every_step(smoke):
    _, out = smoke
    report = json.loads((out / "gpu_check.json").read_text())
    result = {s["name"]: s["result"] for s in report["steps"]}
    hardware = result["env"]["hardware_decoder"]
    assert hardware["in_use"] == "no GPU" and hardware["nvimgcodec_decoded"] == hardware["files"]  # CPU backend
    assert hardware["dali_cpu"]["images_per_s"] > 0
    # The doctor, under its own step's limit: it finished (not timed out) with its verdict, nothing that
    # stops a run; on a 2-core machine a cores warning at most.
    doctor = result["doctor"]["doctor"]
    assert doctor["status"] == "finished" and doctor["rc"] == 0, doctor
    assert doctor["verdict"].startswith("doctor: nothing found that would stop a run") and doctor["ok"] is True
    assert all(problem.startswith("warn ") for problem in doctor["problems"])
    # Every test file in its own pytest process: its own outcome; -k leaves nothing of test_odd_files.py.
    tests = result["tests"]
    assert tests["counts"] == {"PASSED": len(SMOKE_TESTS)} and tests["failed"] == [] and tests["not_ok"] == []
    files = tests["files"]  # the files marked strict_device that hold the smoke tests, in the order they started
    assert set(files) <= set(SMOKE_FILES) and list(tests["per_file"]) == files and len(files) >= 3
    assert tests["per_file"]["test_odd_files.py"]["status"] == "nothing selected"
    assert all(
        f["status"] == "ok" and f["counts"]["PASSED"] >= 1 and 0 < f["seconds"] < f["limit_s"]
        for name, f in tests["per_file"].items()
        if name != "test_odd_files.py"
    )
    runs = result["demo"]["runs"]
    assert {name: run["rc"] for name, run in runs.items()} == {
        "bf16": 0,
        "fp16_chunks2": 0,
        "torch_engine": 0,
        "resume_reference": 0,
        "resume_reference_again": 0,
        "resume_stopped": 75,
    }
    assert runs["resume_stopped"]["rc_after_resume"] == 0 and runs["torch_engine"]["engine"] == "torch"
    assert all(run["top1"] is not None for run in runs.values())
    assert all(
        run["steps_per_s"] > 0 for name, run in runs.items() if name != "resume_stopped"
    )  # resumed: warm-up only
    resume = result["demo"]["resume"]
    assert resume["exact"] is True and resume["deterministic"] is True and resume["stop"]["mid_epoch"] is True
    assert result["demo"]["deterministic_flag"] is True and "--deterministic" in runs["resume_stopped"]["flags"]
    assert result["demo"]["accuracy"]["cpu_demo_top1"] == 84.5
    rows = {(r["method"], r["views"]): r for r in result["loader"]["results"]}
    assert set(rows) == {(m, v) for m in "acg" for v in (1, 4, 10)} | {("f", 1)}
    assert all(r["views_per_s"] > 0 and r["running_views_per_s"] > 0 and r["cores_used"] > 0 for r in rows.values())
    headers = result["loader"]["headers"]  # read once before the cases, which share the sizes
    assert headers["samples"] == result["loader"]["files"] and headers["samples_per_s"] > 0
    assert "Headers read first" in (out / "gpu_check.md").read_text()
    hw = result["loader"]["hw_decoder_load"]  # on the CPU: said to need a GPU, nothing faked
    assert hw["skipped"].startswith("needs a GPU") and hw["rows"] == [] and len(hw["loads"]) == 3
    assert hw["default"] == hw["loads"][0] and hw["loader_keyword"] is True
    augment = {(r["augment"], r["views"]): r for r in result["augment"]["results"]}
    assert (
        set(augment) == {(a, v) for a in ("trivial", "randaugment") for v in (1, 4, 10)}
        and not result["augment"]["errors"]
    )
    assert all(
        r["decoder"] == "cpu"
        and r["stage"] == "dali"
        and r["graph_s"] > r["epoch_start_s"] > 0
        and r["views_per_s"] > 0
        and r["views_per_s"] == pytest.approx(r["samples_per_s"] * r["views"])
        for r in augment.values()
    )
    compiled = result["compile"]
    if "skipped" not in compiled:  # --compile in this checkout: the same profile step, compiled, beside figure5's
        assert compiled["rc"] == 0 and compiled["compiled"]["steps_per_s"] > 0 and compiled["views"] == 4
        assert compiled["compile_s"] is not None and compiled["speedup"] > 0
    for name in ("figure5", "views"):
        fig = result[name]["results"]
        assert [r["views"] for r in fig] == [1, 4, 10]
        assert all(r["steps_per_s"] > 0 and r["memory_images_per_s"] > 0 and 0 <= r["data_stall"] <= 1 for r in fig)
        assert all(set(r["phases_ms"]) == {"data", "h2d", "forward_backward", "allreduce_step"} for r in fig)
    assert all(r["source_ms"] > 0 for r in result["views"]["results"])  # the training thread's time in the source
    targets = [t for t in report["targets"] if t["target"] not in gpu_report.GPU_ONLY]
    assert len(targets) == 10 and all(t["met"] in (True, False) and t["value"] >= 0 for t in targets)
    gpu_only = {t["target"]: t for t in report["targets"] if t["target"] in gpu_report.GPU_ONLY}
    assert list(gpu_only) == list(gpu_report.GPU_ONLY)  # one row each
    syncs = gpu_only[gpu_report.HOST_SYNCS]
    assert syncs["views"] == 4 and syncs["value"] is None and syncs["met"] is None  # counted on CUDA only
    for name in (gpu_report.BATCH_INTACT, gpu_report.DECODER_DIFFERENCE):  # measured on a GPU only: nothing faked
        fact = gpu_only[name]
        assert fact["value"] is None and fact["met"] is None
        assert fact["detail"] == "unmeasured on the CPU: needs a GPU; from loader"
    for name in ("batch_lifetime", "decoder_difference"):
        assert set(result["loader"][name]) == {"views", "skipped"}
        assert result["loader"][name]["skipped"].startswith("needs a GPU")
    assert result["loader"]["facts_process"]["rc"] == 0


def test_the_archive_holds_every_steps_log_and_raw_outputs(smoke):
    _, out = smoke
    with tarfile.open(out / "details.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"details/{step}/log.txt" for step in STEPS} <= names
    assert {f"details/{step}/result.json" for step in STEPS} <= names
    assert {
        "details/tests/test_loader.log",
        "details/tests/test_loader.junit.xml",
        "details/demo/bf16.metrics.jsonl",
        "details/figure5/m10/profile_step.json",
        "details/views/views/profile_views.json",
        "details/doctor/doctor.json",
        "details/doctor/doctor.txt",
    } <= names
    assert not any(name.endswith((".pt", ".jpg")) for name in names)


FAKE_STEPS = textwrap.dedent("""
    import json, pathlib, subprocess, sys, time
    step, folder = sys.argv[1], pathlib.Path(sys.argv[sys.argv.index("--dir") + 1])
    if step == "env":  # writes its machine block, then fails
        (folder / "result.json").write_text(json.dumps({"machine": {"gpu": "fake GPU"}}))
        sys.exit(3)
    if step == "tests":  # hangs, with a child of its own in its own session
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        (folder / "child.pid").write_text(str(child.pid))
        time.sleep(120)
    print("done")
""")


def test_a_failing_or_hanging_step_never_stops_the_next(tmp_path, monkeypatch):
    script = tmp_path / "fake_steps.py"
    script.write_text(FAKE_STEPS)
    monkeypatch.setattr(driver, "STEPS_COMMAND", (sys.executable, str(script)))
    monkeypatch.setattr(driver, "STEPS", tuple(driver.Step(name, name, 3, 3) for name in ("env", "tests", "demo")))
    work, out = tmp_path / "work", tmp_path / "out"
    assert driver.main(["--out", str(out), "--work", str(work), "--smoke"]) == 1
    report = json.loads((out / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [
        ("env", "failed (rc 3)"),
        ("tests", "timed out"),
        ("demo", "ok"),
    ]
    assert report["machine"]["gpu"] == "fake GPU" and report["machine"]["cores"] >= 1
    assert 2.5 < report["steps"][1]["seconds"] < 60  # killed at its 3 s limit, not after its child's 120 s sleep
    child = int((work / "details" / "tests" / "child.pid").read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert "killed after 3 s" in (work / "details" / "tests" / "log.txt").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["details.tar.gz", "gpu_check.json", "gpu_check.md"]
    assert "| tests | tests | timed out |" in (out / "gpu_check.md").read_text()


def test_a_step_left_without_time_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "STEPS", (driver.Step("env", "env", 3, 3),))
    assert driver.main(["--out", str(tmp_path), "--budget", "1", "--smoke"]) == 1
    (step,) = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert step["status"] == "skipped (no time left)"


def test_an_optional_step_runs_on_what_is_left_or_is_skipped_with_a_note(tmp_path, monkeypatch):
    script = tmp_path / "quick_steps.py"
    script.write_text("print('done')\n")
    monkeypatch.setattr(driver, "STEPS_COMMAND", (sys.executable, str(script)))
    monkeypatch.setattr(
        driver, "STEPS", (driver.Step("env", "env", 30, 30), driver.Step("compile", "compile", 60, 60, needs_s=50))
    )
    assert driver.main(["--out", str(tmp_path / "a"), "--budget", "40", "--smoke"]) == 0  # skipped: not a failure
    env, compiled = json.loads((tmp_path / "a" / "gpu_check.json").read_text())["steps"]
    assert env["status"] == "ok" and compiled["optional"] is True
    assert (
        compiled["status"].startswith("skipped (not enough time left: ")
        and "of the 50 s it needs" in compiled["status"]
    )
    assert "(optional: on what is left)" in (tmp_path / "a" / "gpu_check.md").read_text()
    assert driver.main(["--out", str(tmp_path / "b"), "--budget", "100", "--smoke"]) == 0
    env, compiled = json.loads((tmp_path / "b" / "gpu_check.json").read_text())["steps"]
    assert compiled["status"] == "ok" and 50 <= compiled["limit_s"] <= 60


def test_targets_are_ratios_of_one_run_and_unmeasured_where_a_step_gave_nothing():
    loader = [
        dict(
            method=m,
            views=v,
            running_views_per_s=rate * v,
            running_samples_per_s=rate,
            views_per_s=rate * v / 2,
            samples_per_s=rate / 2,
        )
        for m, v, rate in (("a", 4, 900), ("c", 4, 300), ("a", 10, 500), ("c", 10, 200), ("a", 1, 700), ("f", 1, 1000))
    ]
    figure5 = [
        dict(views=1, data_stall=0.01, images_per_s=97, memory_images_per_s=100),
        dict(
            views=4, data_stall=0.05, images_per_s=90, memory_images_per_s=100, syncs_per_step=2, sync_sites=["a.py:3"]
        ),
    ]
    augment = [
        dict(augment="randaugment", views=4, views_per_s=400.0),
        dict(augment="randaugment", views=10, views_per_s=800.0),
    ]
    steps = {"loader": {"result": {"results": loader}}, "figure5": {"result": {"results": figure5}}}
    found = {
        (t["target"].split()[0] + " " + t["target"].split()[1], t["views"]): t
        for t in gpu_report.targets({**steps, "augment": {"result": {"results": augment}}})
    }
    assert found["dali-ba views/s", 4]["value"] == pytest.approx(3.0) and found["dali-ba views/s", 4]["met"]
    assert found["dali-ba views/s", 10]["value"] == pytest.approx(2.5) and not found["dali-ba views/s", 10]["met"]
    assert found["dali-ba samples/s", 1]["value"] == pytest.approx(0.7) and found["dali-ba samples/s", 1]["met"]
    assert found["data stall", 1]["met"] and not found["data stall", 4]["met"]
    assert found["training images/s", 1]["met"] and not found["training images/s", 4]["met"]
    assert found["dali-ba views/s", 4]["detail"] == "a 3600 / c 1200 views/s (whole epochs: 3.00)"
    assert found["host syncs", 4]["value"] == 2 and not found["host syncs", 4]["met"]
    assert "a.py:3" in found["host syncs", 4]["detail"]
    scaling = found["randaugment on", 10]  # a batch at M = 10: 10 / 800 s, at M = 4: 4 / 400 s
    assert scaling["value"] == pytest.approx(1.25) and scaling["met"] and "800 at M = 10" in scaling["detail"]
    augment[1]["views_per_s"] = 400.0 * 10 / 4 / 2.6
    (slow,) = [
        t
        for t in gpu_report.targets({"augment": {"result": {"results": augment}}})
        if t["views"] == 10 and "randaugment" in t["target"]
    ]
    assert slow["value"] == pytest.approx(2.6) and slow["met"] is False
    unmeasured = gpu_report.targets({})
    assert len(unmeasured) == 13 and all(t["met"] is None and t["value"] is None for t in unmeasured)


def test_test_outcomes_are_read_from_a_verbose_log_even_when_cut_short():
    log = "\n".join(
        [
            "tests/test_a.py::test_one PASSED                [ 10%]",
            "tests/test_a.py::test_two[x-1] FAILED           [ 20%]",
            "tests/test_a.py::test_two[x-1] ERROR            [ 20%]",
            "tests/test_b.py::test_three SKIPPED (no GPU)    [ 30%]",
            "tests/test_b.py::test_four ",
        ]
    )
    assert read_outcomes(log) == {
        "tests/test_a.py::test_one": "PASSED",
        "tests/test_a.py::test_two[x-1]": "ERROR",
        "tests/test_b.py::test_three": "SKIPPED",
    }


def test_the_tests_step_runs_the_files_of_make_tests_strict_device_pass():
    """The step reads the strict_device marker from the test files' code; pytest's own selection (make test's
    second pass, -m strict_device) finds the same files, and besides them only this one, never run by the step."""
    done = run_cli(
        sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "strict_device", "tests"
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    collected = {line.split("::")[0].removeprefix("tests/") for line in done.stdout.splitlines() if "::" in line}
    assert collected == {*marked_files(), OWN_TEST} and {"test_loader.py", "test_train.py"} <= collected
    assert set(SMOKE_FILES) <= set(marked_files())


FAKE_NVIDIA_SMI = """#!/bin/sh
case "$1" in
  dmon) printf '# gpu     sm    mem    enc    dec    jpg    ofa\\n# Idx      %%      %%      %%      %%      %%      %%\\n'
        printf '    0      3      1      0      0     42      -\\n    0      2      1      0      0     57      0\\n' ;;
  *) echo "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB" ;;
esac
"""  # noqa: E501 - nvidia-smi's own fixed-width columns


def test_nvidia_smi_is_read_for_the_gpu_and_the_jpeg_engines(tmp_path, monkeypatch):
    (tmp_path / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    info = nvidia_smi()
    assert info["driver"] == "580.159.04" and info["nvidia_smi"]["name"] == "NVIDIA H100 80GB HBM3"
    with JpgUtilisation(samples=2) as jpg:
        pass
    assert jpg.samples == [42, 57]


def test_the_two_parts_fit_the_device_calls_and_the_device_time_of_a_task():
    parts = {part: [s for s in driver.STEPS if s.part == part] for part in driver.PARTS}
    assert [s.name for s in parts[1]] == ["env", "doctor", "tests", "demo", "loader"]  # the doctor right after env
    assert [s.name for s in parts[2]] == ["figure5", "compile", "views", "augment"]
    for steps in parts.values():
        assert sum(s.budget_s for s in steps) <= driver.PART_BUDGET_S <= 600 - 60  # a call, DALI unpacked first
        optional = [s for s in steps if s.needs_s]
        assert steps[len(steps) - len(optional) :] == optional and all(s.needs_s <= s.budget_s for s in optional)
    # the machine's start and DALI's three parts (about 45 s on the H200), then the two calls
    assert 45 + 20 + 2 * driver.PART_BUDGET_S + 2 * 30 <= driver.DEVICE_TIME_S
    assert "compile" in [s.name for s in parts[2] if not s.needs_s]  # its own share: a cold compile


def test_part_2_reuses_the_images_part_1_made_in_the_same_work_folder(tmp_path):
    from benchmarks.gpu_check.context import SMOKE, Ctx, ensure_images

    work = tmp_path / "work"
    (work / "details").mkdir(parents=True)
    train = ensure_images(Ctx(True, work, work, time.time() + 600))
    first = sorted(p.stat().st_ino for p in train.rglob("*.jpg"))
    assert len(first) == SMOKE.images * SMOKE.copies
    driver.empty(work)
    assert not (work / "details").exists()
    again = ensure_images(Ctx(True, work, work, time.time() + 600))
    assert sorted(p.stat().st_ino for p in again.rglob("*.jpg")) == first  # the same files, not made again


def test_the_markdown_report_shows_what_only_a_gpu_run_has():
    decode = dict(hw_decoder_load=0.0, images=6400, images_per_s=3200.0, cpu_ms_per_image=2.5, cores_busy=8.0)
    env = dict(
        hardware_decoder=dict(
            files=512,
            nvimgcodec_backend="hw_gpu_only",
            nvimgcodec_decoded=64,
            in_use=True,
            evidence="nvidia-smi JPG utilisation",
            nvidia_smi_jpg_utilisation=[0, 71, 70],
            dali_mixed_hw_load_0=decode,
            dali_mixed_default=dict(decode, hw_decoder_load="default", cpu_ms_per_image=0.9),
        )
    )
    demo = dict(
        runs={
            "bf16": dict(
                flags="--amp bf16",
                rc=0,
                device="cuda",
                decoder="mixed",
                engine="none",
                engine_backend=None,
                top1=83.0,
                top5=99.0,
                steps_per_s=40.0,
                seconds=30.0,
            )
        },
        accuracy=dict(gpu_bf16_top1=83.0, cpu_demo_top1=84.5, difference=-1.5),
        resume=dict(
            stop=dict(rc=75, step=5, steps_per_epoch=40, mid_epoch=True),
            deterministic=False,
            exact=None,
            max_abs_difference_resumed=2e-6,
            max_abs_difference_run_to_run=3e-6,
        ),
    )
    doctor = dict(
        doctor=dict(
            status="finished",
            rc=0,
            seconds=9.5,
            verdict="doctor: nothing found that would stop a run",
            ok=True,
            problems=[],
        )
    )
    tests = dict(
        cuda=True,
        parallel=4,
        files=["test_loader.py", "test_resume.py"],
        select="not make_demo",
        per_file={
            "test_loader.py": dict(status="ok", rc=0, seconds=41.0, limit_s=67.5, counts={"PASSED": 13}, failed=[]),
            "test_resume.py": dict(
                status="timed out",
                rc=None,
                seconds=67.5,
                limit_s=67.5,
                counts={"FAILED": 1, "PASSED": 3},
                failed=["tests/test_resume.py::x"],
            ),
        },
        counts={"FAILED": 1, "PASSED": 16},
        failed=["tests/test_resume.py::x"],
    )
    loader = dict(
        files=8192,
        batch=64,
        view_size=224,
        workers=16,
        epoch_seconds=2.0,
        results=[],
        hw_decoder_load=dict(
            default=0.65,
            loads=[0.65, 0.35, 0.9],
            loader_keyword=True,
            views=4,
            rows=[
                dict(
                    hw_decoder_load=0.65,
                    default=True,
                    decode=dict(images_per_s=9000.0, cpu_ms_per_image=0.5),
                    loader=dict(views_per_s=20000.0, running_views_per_s=21000.0, cores_used=6.0),
                ),
                dict(
                    hw_decoder_load=0.9,
                    default=False,
                    decode=dict(images_per_s=8000.0, cpu_ms_per_image=0.3),
                    loader=dict(error="RuntimeError: no"),
                ),
            ],
        ),
    )
    augment = dict(
        files=8192,
        batch=64,
        view_size=224,
        threads=16,
        seconds_per_case=2.0,
        errors={},
        results=[
            dict(
                augment="randaugment",
                views=4,
                decoder="mixed",
                stage="dali",
                graph_s=12.5,
                epoch_start_s=0.2,
                views_per_s=15000.0,
                samples_per_s=3750.0,
            )
        ],
    )
    compiled = dict(
        views=4,
        arch="resnet50",
        rc=0,
        seconds=95.0,
        uncompiled_seconds=30.0,
        compile_s=65.0,
        inductor_cache="cold (a new folder)",
        speedup=1.25,
        compiled=dict(steps_per_s=10.0, data_stall=0.01),
        uncompiled=dict(steps_per_s=8.0),
    )
    steps = [
        ("env", "Environment", env, 30),
        ("doctor", "Doctor", doctor, 20),
        ("tests", "Tests", tests, 90),
        ("demo", "Demo", demo, 80),
        ("loader", "Loader", loader, 85),
        ("augment", "Auto-augment", augment, 50),
        ("compile", "Compiled", compiled, 90),
    ]
    report = dict(
        smoke=False,
        note="GPU run",
        started="now",
        wall_s=400.0,
        budget_s=470,
        command="gpu_check.py",
        machine=dict(gpu="NVIDIA H100 80GB HBM3", driver="580.159.04", cores=16),
        steps=[
            dict(
                name=name,
                title=title,
                status="ok",
                seconds=20.0,
                limit_s=limit,
                budget_s=limit,
                optional=name == "compile",
                result=result,
            )
            for name, title, result, limit in steps
        ],
        targets=gpu_report.targets({}),
    )
    md = gpu_report.markdown(report)
    assert md.startswith("# GPU check: NVIDIA H100 80GB HBM3") and "SMOKE" not in md and "smoke run" not in md
    assert "in use by DALI: **True**" in md and "| dali_mixed_default | default | 3200 | 0.9 | 8 |" in md
    assert "| bf16 | --amp bf16 | 0 | cuda | mixed | none (None) | 83 | 99 | 40 | 30 |" in md
    assert "max |difference| resumed 2e-06, run to run 3e-06" in md and "not measured" in md
    assert "verdict: **doctor: nothing found that would stop a run**" in md
    assert "| test_loader.py | ok | 41 | 67.5 | 13 passed | – |" in md
    assert "| test_resume.py | timed out | 67.5 | 67.5 | 1 failed, 3 passed | 1 |" in md
    assert (
        "| 0.65 (default) | 9000 | 0.5 | 20000 | 21000 | 6 |" in md and "| 0.9 | 8000 | 0.3 | RuntimeError: no |" in md
    )
    assert "| randaugment | 4 | mixed / dali | 12.5 | 0.2 | 15000 | 3750 |" in md
    assert "compile time **65 s** with inductor's cache cold" in md and "(speed-up 1.25)" in md
    assert "| compile | Compiled | ok | 20 | 90 | 90 (optional: on what is left) |" in md
