"""Parts of the GPU check (benchmarks/gpu_check/) run for real on the CPU at smoke sizes: the loader step's
cases (guarded one by one, closed before the next, in an order that favours no side), the budget's share
for compile, figure5's shares of its time per M, a step killed at its limit keeping what it finished, and
the parts of the two facts only a GPU can tell (facts.py), their rows unmeasured on the CPU."""

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from conftest import REPO

from benchmarks.gpu_check import driver
from benchmarks.gpu_check.context import SMOKE, Ctx
from dali_ba.loading.feed import MIXED_DECODE_TOLERANCE


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The smoke run's ImageNet-like JPEGs, made once."""
    from benchmarks.gpu_check.context import ensure_images

    work = tmp_path_factory.mktemp("work")
    ensure_images(Ctx(True, work, work, time.time() + 600))
    return work


def test_the_loader_cases_take_turns_and_each_warms_up_on_its_own():
    from benchmarks.gpu_check.steps_loader import case_order

    order = case_order((1, 4, 10))
    assert sorted(order) == sorted({*[(m, v) for m in "acg" for v in (1, 4, 10)], ("f", 1)})
    first = {v: [m for m, w in order if w == v and m in "ac"][0] for v in (1, 4, 10)}
    assert first == {1: "c", 4: "a", 10: "c"}  # neither side always the first (or the last) of its M
    assert [v for _, v in order] == sorted(v for _, v in order)  # one M at a time: no case after a larger M's


def worker_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += sum(psutil.Process(pid).cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def test_a_cut_epoch_leaves_the_dataloader_workers_idle_and_close_ends_them(images):
    """A DataLoader epoch cut after its second batch leaves batches in flight; run_epoch receives them outside
    its timing, so the workers are idle when the next case would be timed; close() ends them."""
    from benchmarks.gpu_check.steps_loader import time_limited
    from benchmarks.peers import Runner, run_epoch, torch_loader
    from dali_ba.data.dataset import load_dataset

    dataset = load_dataset(images / "imagenet_like" / "train")
    args = SimpleNamespace(threads=2, batch=8, size=128, seed=0)
    runner = torch_loader("c", dataset, 32, args)  # 6 batches an epoch, 2 x 2 asked for ahead
    cut = Runner(time_limited(runner.epoch, 0.0), runner.pids, runner.settle, runner.close)  # cut at the 2nd batch
    try:
        epoch = run_epoch(cut, 1)
        assert epoch["batches"] == 2  # a timed epoch: 2 batches at least
        pids = runner.pids()
        assert len(pids) == 2
        before = worker_cpu(pids)
        time.sleep(1.0)
        assert worker_cpu(pids) - before < 0.05  # idle; else making the 4 batches in flight
        assert run_epoch(cut, 2)["batches"] == 2  # the next epoch starts as usual on the same workers
        assert runner.pids() == pids
    finally:
        runner.close()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


def test_a_failing_loader_case_is_one_error_row_and_the_others_are_measured(images, tmp_path, monkeypatch):
    """torchvision's GPU decode failing (here: made to raise on its first batch) costs its three cases only;
    every other case is measured, in the order of the rule, with no worker of an earlier case left running."""
    from benchmarks.gpu_check import steps_loader
    from benchmarks.gpu_check.torchvision_on_device import TorchvisionOnDevice

    def failing(self, index):
        raise RuntimeError("nvJPEG: decode failed")
        yield

    monkeypatch.setattr(TorchvisionOnDevice, "epoch", failing)
    folder = tmp_path / "loader"
    folder.mkdir()
    ctx = Ctx(True, folder, images, time.time() + 300)
    assert steps_loader.step_loader(ctx) == 1  # a failed case: the step is not ok
    saved = json.loads((folder / "result.json").read_text())
    rows = {(r["method"], r["views"]): r for r in saved["results"]}
    assert [f"{r['method']} M={r['views']}" for r in saved["results"]] == saved["order"]
    assert saved["order"] == [f"{m} M={v}" for m, v in steps_loader.case_order(SMOKE.views)]
    assert saved["errors"] == 3 and "order_rule" in saved
    for (method, _), row in rows.items():
        assert row["processes_before"] == 0  # the previous case's DataLoader workers ended and joined
        if method == "g":
            assert row["error"] == "RuntimeError: nvJPEG: decode failed" and "samples_per_s" not in row
        else:
            assert "error" not in row and row["samples_per_s"] > 0 and row["epochs"]


def test_compile_has_its_own_share_of_the_budget():
    steps = {s.name: s for s in driver.STEPS}
    assert not steps["compile"].needs_s and steps["compile"].budget_s >= 100
    assert [s.name for s in driver.STEPS].index("compile") < min(
        i for i, s in enumerate(driver.STEPS) if s.needs_s
    )  # ahead of every optional step
    assert (SMOKE.compile_steps, SMOKE.compile_warmup) == (3, 1)
    from benchmarks.gpu_check.context import FULL

    assert (FULL.compile_steps, FULL.compile_warmup) == (10, 3)


def test_figure5_gives_each_m_its_own_share_of_the_time():
    from benchmarks.gpu_check.steps_train import m_share

    # 120 s left: M = 1, 4 and 10 get 31/105, 34/74 and all of what is then left, each more than the
    # 28-35 s a profile took on the H200 (M = 1, first, was cut at 29 s under the old weights)
    assert m_share([1, 4, 10]) == pytest.approx(31 / 105) and m_share([4, 10]) == pytest.approx(34 / 74)
    assert m_share([10]) == 1.0
    left = 120.0
    first = left * m_share([1, 4, 10])
    second = (left - first) * m_share([4, 10])
    assert left - first - second == pytest.approx(120 * 40 / 105)
    assert min(first, second, left - first - second) > 34


def test_the_views_step_whose_profile_is_killed_at_its_limit_keeps_the_ms_it_finished(images, tmp_path):
    """The GPU check's views step (profile views over M = 1, 4, 10 on the smoke recipe) whose profile run is
    killed, as the step's limit kills it, once M = 1 is saved: the step records M = 1, marked incomplete, and
    fails; the profile it leaves (archived with the step's folder) holds M = 1 too."""
    from benchmarks.gpu_check.processes import child_env, kill_tree

    folder = tmp_path / "views"
    command = [sys.executable, "-m", "benchmarks.gpu_check.steps", "views", "--smoke"]
    command += ["--dir", str(folder), "--work", str(images), "--limit", "600"]
    step = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL)
    profile_file = folder / "views" / "profile_views.json"
    try:
        while step.poll() is None and not profile_file.exists():
            time.sleep(0.02)
        assert step.poll() is None, "the views step ended before its profile showed a partial sweep"
        for child in psutil.Process(step.pid).children():  # the profile run: killed as at its limit
            kill_tree(child.pid)
        assert step.wait(timeout=120) == 1
    finally:
        kill_tree(step.pid)
    left = json.loads(profile_file.read_text())
    assert left["complete"] is False and left["measured"][0] == 1 and left["views"] == [1, 4, 10]
    assert [r["views"] for r in left["results"]] == left["measured"] and len(left["measured"]) < 3
    result = json.loads((folder / "result.json").read_text())
    assert result["complete"] is False and result["rc"] is not None and result["rc"] < 0  # killed by a signal
    assert result["measured"] == left["measured"] and [r["views"] for r in result["results"]] == left["measured"]
    assert result["results"][0]["steps_per_s"] > 0


def test_figure5_keeps_the_windows_of_an_m_killed_at_its_limit(images, tmp_path):
    """figure5 (profile step at M = 1, 4, 10, smoke recipe) with M = 1's run killed, as at its limit, once its
    first window is saved: M = 1's row holds that window and says it was cut; M = 4 and 10 are measured whole."""
    from benchmarks.gpu_check.processes import child_env, kill_tree

    folder = tmp_path / "figure5"
    command = [sys.executable, "-m", "benchmarks.gpu_check.steps", "figure5", "--smoke"]
    command += ["--dir", str(folder), "--work", str(images), "--limit", "600"]
    step = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL)
    profile_file = folder / "m1" / "profile_step.json"
    try:
        while step.poll() is None and not profile_file.exists():
            time.sleep(0.02)
        assert step.poll() is None, "figure5 ended before M = 1's profile showed a window"
        for child in psutil.Process(step.pid).children():  # M = 1's profile run: killed as at its limit
            kill_tree(child.pid)
        assert step.wait(timeout=300) == 1
    finally:
        kill_tree(step.pid)
    result = json.loads((folder / "result.json").read_text())
    rows = {row["views"]: row for row in result["results"]}
    assert sorted(rows) == [1, 4, 10] and result["runs"]["1"]["rc"] < 0
    cut = rows[1]
    assert cut["complete"] is False and "pipeline" in cut["windows"] and cut["loader_alone_samples_per_s"] > 0
    assert cut["data_stall"] is None  # needs all three windows
    for m in (4, 10):
        assert rows[m]["complete"] is True and rows[m]["data_stall"] is not None and rows[m]["steps_per_s"] > 0
    assert all(0 < run["limit_s"] for run in result["runs"].values()) and "share_rule" in result


# --- the two facts only a GPU can tell (benchmarks/gpu_check/facts.py), their parts on the CPU -------------


def test_pixel_difference_finds_the_largest_and_the_share_that_differ():
    from benchmarks.gpu_check.facts import pixel_difference

    ours = [np.zeros((2, 3, 3), np.uint8), np.full((4, 1, 3), 200, np.uint8)]
    assert pixel_difference(ours, [a.copy() for a in ours]) == dict(
        equal=True, arrays=2, values=30, max_abs_difference=0, mean_abs_difference=0.0, share_differing=0.0
    )
    theirs = [a.copy() for a in ours]
    theirs[0][0, 0, 0], theirs[1][3, 0, 2] = 5, 190  # uint8: no wrap-around in the difference
    found = pixel_difference(ours, theirs)
    assert found["equal"] is False and found["max_abs_difference"] == 10
    assert found["mean_abs_difference"] == pytest.approx(15 / 30) and found["share_differing"] == pytest.approx(2 / 30)
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_difference(ours, [theirs[0], theirs[1][:2]])


def batches_in(buffer: torch.Tensor | None):
    """Batches of consecutive values: each a new tensor, or (``buffer``) each written over the last one."""
    for index in itertools.count():
        values = torch.full((2, 3), index, dtype=torch.uint8)
        if buffer is None:
            yield values, torch.zeros(2)
        else:
            buffer.copy_(values)
            yield buffer, torch.zeros(2)


def test_a_batch_kept_is_told_intact_only_when_no_later_batch_writes_over_it():
    from benchmarks.gpu_check.facts import kept_batch, late_read

    fresh = kept_batch(batches_in(None), cuda=False)
    assert fresh["equal"] is True and fresh["max_abs_difference"] == 0 and fresh["memory_reused"] is False
    reused = kept_batch(batches_in(torch.empty(2, 3, dtype=torch.uint8)), cuda=False)
    assert reused["equal"] is False and reused["max_abs_difference"] == 2 and reused["memory_reused"] is True
    # On the CPU nothing is queued: the late copy is made at once, and whether it waited is not known.
    late = late_read(batches_in(torch.empty(2, 3, dtype=torch.uint8)), cuda=False, seconds=0.5)
    assert late["equal"] is True and late["queued"] is None and late["queued_s"] == 0.0


def test_the_facts_code_runs_on_the_cpu_loader(images):
    """The facts' GPU code on the cpu decoder (DALI making the views, its outputs through DLPack), so that its
    first GPU run is not its first run; the torch stage's buffer, written over each batch, is caught."""
    from benchmarks.gpu_check.facts import batch_lifetime, decoder_difference, fact_loader, kept_batch
    from dali_ba.data.dataset import load_dataset

    dataset = load_dataset(images / "imagenet_like" / "train")
    lifetime = batch_lifetime(dataset, SMOKE, decoder="cpu")
    assert (lifetime["decoder"], lifetime["device"], lifetime["batch"], lifetime["views"]) == ("cpu", "cpu", 8, 4)
    assert lifetime["kept"]["values"] == lifetime["late"]["values"] == 8 * 4 * 3 * SMOKE.view_size**2
    assert lifetime["late"]["queued"] is None and lifetime["late"]["queued_s"] == 0.0
    # torch's stage renders the views into one reused buffer: a batch is valid until the next one only
    reused = kept_batch(fact_loader(dataset, SMOKE, "cpu").epoch(0, stage="torch"), cuda=False)
    assert reused["equal"] is False and reused["max_abs_difference"] > 0 and reused["memory_reused"] is True
    same = decoder_difference(dataset, SMOKE, decoders=("cpu", "cpu"))
    assert same["decoders"] == ["cpu", "cpu"] and same["whole"]["arrays"] == SMOKE.batch
    assert same["whole"]["equal"] and same["as_views"]["equal"] and same["as_views"]["arrays"] == 1


def test_a_fact_that_fails_is_its_own_error_and_the_other_is_measured(monkeypatch, tmp_path):
    from benchmarks.gpu_check import facts

    def failing(dataset, s):
        raise RuntimeError("DLPack: no")

    monkeypatch.setattr(facts, "gpu", lambda: True)
    monkeypatch.setattr("dali_ba.data.dataset.load_dataset", lambda folder: [])
    monkeypatch.setattr(
        facts, "FACTS", {"batch_lifetime": (failing, "why"), "decoder_difference": (lambda d, s: {"whole": 1}, "why")}
    )
    out = tmp_path / "facts.json"
    assert facts.main(["--data", str(tmp_path), "--out", str(out), "--smoke"]) == 1
    assert json.loads(out.read_text()) == {
        "batch_lifetime": {"error": "RuntimeError: DLPack: no"},
        "decoder_difference": {"whole": 1},
    }


def test_the_loader_step_keeps_the_facts_its_process_finished(monkeypatch, tmp_path):
    """The facts' process killed at its limit after the first fact: that one is kept, the other is an error
    (an error row of its own in the report), both saved in the step's result."""
    from benchmarks.gpu_check import steps_loader

    def killed(command, log, limit, env):
        out = Path(command[command.index("--out") + 1])
        out.write_text(json.dumps({"batch_lifetime": {"views": 4, "skipped": "needs a GPU: no"}}))
        return None, limit

    monkeypatch.setattr(steps_loader, "run_logged", killed)
    ctx = Ctx(True, tmp_path, tmp_path, time.time() + 600, result={"errors": 0})
    steps_loader.measure_facts(ctx, tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["batch_lifetime"] == {"views": 4, "skipped": "needs a GPU: no"}
    assert saved["decoder_difference"] == {
        "error": "the facts' process was killed at its limit (30 s) before this fact"
    }
    assert saved["errors"] == 1 and saved["facts_process"] == dict(rc=None, seconds=30.0, limit_s=30.0)


def test_the_facts_are_target_rows_unmeasured_on_the_cpu_and_judged_on_a_gpu():
    from benchmarks.gpu_check import report

    def rows(lifetime: dict, decoded: dict) -> tuple[dict, dict]:
        found = {
            t["target"]: t
            for t in report.targets({"loader": {"result": dict(batch_lifetime=lifetime, decoder_difference=decoded)}})
        }
        return found[report.BATCH_INTACT], found[report.DECODER_DIFFERENCE]

    cpu = rows({"views": 4, "skipped": "needs a GPU: DLPack"}, {"views": 4, "skipped": "needs a GPU: mixed"})
    for row in cpu:
        assert row["value"] is None and row["met"] is None
        assert row["detail"] == "unmeasured on the CPU: needs a GPU; from loader"
    assert cpu[0]["views"] == 4 and cpu[0]["threshold"] == 0 and cpu[1]["threshold"] == MIXED_DECODE_TOLERANCE
    failed = rows({"error": "RuntimeError: x"}, {})
    assert [row["met"] for row in failed] == [None, None] and failed[0]["detail"].startswith(
        "not measured: RuntimeError"
    )

    def difference(largest: int) -> dict:
        return dict(
            equal=largest == 0,
            arrays=1,
            values=10,
            max_abs_difference=largest,
            mean_abs_difference=0.5,
            share_differing=0.1,
        )

    def lifetime(kept: int, late: int) -> dict:
        return dict(
            decoder="mixed",
            batch=64,
            views=4,
            kept=dict(difference(kept), memory_reused=kept > 0),
            late=dict(difference(late), queued_s=0.5, queued=True),
        )

    def decoded(whole: int) -> dict:
        return dict(whole=difference(whole), as_views=difference(5), views=4, view_size=224, hw_decoder_load=0.65)

    intact, within = rows(lifetime(0, 0), decoded(MIXED_DECODE_TOLERANCE))
    assert (intact["value"], intact["met"], within["value"], within["met"]) == (0, True, MIXED_DECODE_TOLERANCE, True)
    assert (
        "kept: intact yes" in intact["detail"]
        and "still queued when the two batches were made: yes" in intact["detail"]
    )
    assert "as dali-ba's views (M = 4, 224 px" in within["detail"] and "max 5" in within["detail"]
    overwritten, beyond = rows(lifetime(0, 7), decoded(MIXED_DECODE_TOLERANCE + 1))
    assert (overwritten["value"], overwritten["met"], beyond["met"]) == (7, False, False)
    assert (
        "kept: intact yes" in overwritten["detail"] and "work: intact no (largest difference 7" in overwritten["detail"]
    )
    rendered = (*cpu, *failed, intact, within, overwritten, beyond)
    assert not any("|" in row["target"] + row["detail"] for row in rendered)  # cells of the Markdown table


def test_a_test_file_killed_at_its_limit_still_says_why_its_tests_failed(tmp_path):
    """The first GPU run lost why a test failed: its pytest was killed before the summary. The step's
    plugin writes each failure when it happens; the step reads the first ``E`` line back."""
    from benchmarks.gpu_check import pytest_failures
    from benchmarks.gpu_check.processes import child_env
    from benchmarks.gpu_check.steps_tests import failure_reasons

    (tmp_path / "test_late.py").write_text(
        "import time\n"
        "def test_fails():\n    assert 1 == 2, 'mpirun needs Horovod'\n"
        "def test_hangs():\n    time.sleep(600)\n"
    )
    failures = tmp_path / "failures.txt"
    env = dict(child_env(), **{pytest_failures.ENV: str(failures)})
    command = [sys.executable, "-m", "pytest", "-p", "benchmarks.gpu_check.pytest_failures", "-p", "no:cacheprovider"]
    process = subprocess.Popen([*command, str(tmp_path / "test_late.py")], cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 60
        while not failures.is_file() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert process.poll() is None  # still inside test_hangs: the failure came before the end
    finally:
        process.kill()
        process.wait()
    reasons = failure_reasons(failures.read_text())
    assert list(reasons) == ["test_late.py::test_fails"]
    assert "AssertionError: mpirun needs Horovod" in reasons["test_late.py::test_fails"]


def test_a_rerun_gives_chosen_steps_other_limits(tmp_path, capsys):
    out = tmp_path / "out"
    assert driver.main(["--out", str(out), "--smoke", "--steps", "env,doctor", "--limits", "env=1"]) == 1
    steps = {s["name"]: s for s in json.loads((out / "gpu_check.json").read_text())["steps"]}
    assert steps["env"]["limit_s"] == 1 and steps["env"]["status"] == "skipped (no time left)"
    assert steps["doctor"]["budget_s"] == driver.STEPS[1].smoke_budget_s  # the others keep theirs
    with pytest.raises(SystemExit):
        driver.main(["--out", str(out), "--steps", "env", "--limits", "figure5=150"])
    assert "--limits names steps not run: ['figure5']" in capsys.readouterr().err


def test_the_dali_ba_cases_share_the_headers_sizes_read_before_them(images):
    """On the H200 the loader cases were timed mostly over first reads, each parsing its samples'
    headers: the sizes are now read once before them, and each dali-ba loader starts with them."""
    from benchmarks.gpu_check.context import ensure_images
    from benchmarks.gpu_check.steps_loader import read_headers, with_sizes
    from dali_ba.data.dataset import load_dataset
    from dali_ba.loading.loader import BatchAugmentLoader
    from dali_ba.loading.reader import header_size

    dataset = load_dataset(ensure_images(Ctx(True, images, images, time.time() + 600)))
    sizes, rate = read_headers(dataset)
    assert rate["samples"] == len(dataset) and rate["samples_per_s"] > 0
    assert [tuple(sizes[i]) for i in (0, len(dataset) - 1)] == [
        header_size(dataset.read(i)) for i in (0, len(dataset) - 1)
    ]
    loader = with_sizes(BatchAugmentLoader(dataset, batch_size=4, views=2, view_size=32, decoder="cpu"), sizes)
    next(iter(loader))  # its reader fills nothing new: every size was there
    assert loader.sizes is sizes and (sizes >= 0).all()
    assert with_sizes(loader, None).sizes is sizes  # None: the loader keeps its own
