"""Parts of the GPU check (benchmarks/gpu_check/) run for real on the CPU at smoke sizes: the loader step's
cases (guarded one by one, closed before the next, in an order that favours no side)."""

import json
import time
from types import SimpleNamespace

import psutil
import pytest

from benchmarks.gpu_check.context import SMOKE, Ctx


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
