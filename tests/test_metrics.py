"""Step timing: phase clocks, statistics over ranks, the steady-state summary, the progress lines."""

import io

import numpy as np
import pytest
import torch

from dali_ba.training.console import Progress
from dali_ba.training.step import gradient_norm
from dali_ba.training.step_clock import COLUMNS, PHASES, StepClock
from dali_ba.training.step_times import StepTimes, summary_table


class FakeWorld:
    """Three ranks whose rows are the local rows scaled by (1, 2, 3): gather as mpi4py's allgather."""

    rank, size, is_root = 0, 3, True

    def gather(self, rows):
        return [[[v * k for v in row] for row in rows] for k in (1, 2, 3)]


def test_phases_are_consecutive_and_make_up_the_step():
    clock = StepClock(torch.device("cpu"))
    clock.begin()
    for name in PHASES:
        with clock.phase(name):
            sum(range(20000))
    row = clock.end().seconds()
    assert len(row) == len(COLUMNS) and all(t > 0 for t in row)
    assert sum(row[:-1]) == pytest.approx(row[-1], rel=0.05)


class FakeEvent:
    """A CUDA event's interface, at made-up times; counts the waits for it."""

    clock, waits = 0.0, 0

    def __init__(self):
        FakeEvent.clock += 0.25
        self.t = FakeEvent.clock

    def synchronize(self):
        FakeEvent.waits += 1

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3  # milliseconds, as CUDA's


def test_a_gpu_step_waits_for_nothing_until_its_row_is_logged(monkeypatch):
    """On a GPU the phase marks are events: logging reads them (one wait per row), a step never
    waits; phases still add up to the step, and DDP's wait inside backward moves to allreduce_step."""
    import dali_ba.training.step_clock as metrics

    monkeypatch.setattr(metrics, "timestamp", lambda device: FakeEvent())
    monkeypatch.setattr(
        torch.cuda,
        "nvtx",
        type("NoNvtx", (), {"range_push": staticmethod(lambda name: None), "range_pop": staticmethod(lambda: None)}),
    )
    clock, times = StepClock(torch.device("cuda")), StepTimes(FakeWorld(), warmup=0)
    for step in range(3):
        clock.begin()
        for name in PHASES:
            with clock.phase(name):
                if name == "forward_backward":  # DDP's buckets: handed over, then the wait ends
                    span = (FakeEvent(), FakeEvent())
        clock.move("forward_backward", "allreduce_step", span)
        times.add(clock.end(), torch.tensor(0.5), step_in_epoch=step, step=step + 1)
    assert FakeEvent.waits == 0
    records = times.flush()
    assert FakeEvent.waits > 0
    for record in records:
        t = {name: record["time"][name]["min"] for name in COLUMNS}  # rank 0's (FakeWorld scales the others)
        assert t == pytest.approx(
            {"data": 0.25, "h2d": 0.25, "forward_backward": 0.5, "allreduce_step": 0.5, "step": 1.5}
        )
        assert record["loss"] == pytest.approx(1.0)  # mean over the fake ranks of (0.5, 1, 1.5)


def test_rank_statistics_and_steady_state():
    times = StepTimes(FakeWorld(), warmup=1)
    for i in range(3):
        times.add([0.1, 0.0, 0.2, 0.1, 0.4], loss=1.0 + i, step_in_epoch=i, step=i + 1)
    records = times.flush()
    assert [r["step"] for r in records] == [1, 2, 3]
    data = records[0]["time"]["data"]
    assert data == {
        "mean": 0.2,
        "std": pytest.approx(np.std([0.1, 0.2, 0.3]), abs=1e-6),
        "min": 0.1,
        "max": 0.3,
        "slowest_rank": 2,
    }
    assert records[1]["loss"] == pytest.approx(2 * 2.0)  # mean over ranks of (2, 4, 6)
    assert len(times.steady) == 2  # step 0 of the epoch was warm-up
    summary = times.summary(batch_size=8, views=4)
    assert summary["steady_steps"] == 2
    assert summary["steps_per_s"] == pytest.approx(1 / 0.8) and summary["steps_per_s_std"] == pytest.approx(0)
    assert summary["views_per_s"] == pytest.approx(4 * 8 / 0.8)
    assert summary["timing"]["step"]["slowest_rank"] == 2 and summary["timing"]["step"]["max_rank"] == pytest.approx(
        1.2
    )
    table = summary_table(summary, ranks=3)
    assert "forward_backward" in table and "1.25 ± 0.00 steps/s" in table


def test_progress_prints_plain_lines_when_not_a_terminal(capsys):
    progress = Progress(total=6, initial=0, every=3, enabled=True, stream=io.StringIO())
    for step in range(1, 7):
        progress.update(step, epoch=0, loss=1.5, lr=0.1)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["3/6", "6/6"] and "loss 1.5000" in lines[0]


def test_gradient_norm_is_the_l2_norm_of_all_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model(torch.ones(4, 3)).sum().backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert float(gradient_norm(model)) == pytest.approx(expected, rel=1e-6) and expected > 0
