"""The start-up's accounting (dali_ba/training/startup.py): the clock's phases, and a run's start-up
record and line."""

import json
import re
import sys

import pytest
from conftest import run_cli

from dali_ba.training import startup
from dali_ba.training.startup import StartupClock, startup_line

PHASES = ["engine", "index", "model", "dali_graph", "first_step"]  # in the order a run meets them
LINE = re.compile(
    r"start-up: engine \d+\.\d s, index \d+\.\d s, model \d+\.\d s, DALI graph \d+\.\d s, "
    r"first step \d+\.\d s, other \d+\.\d s \((\d+\.\d) s to the end of the first step\)"
)


@pytest.fixture
def ticks(monkeypatch):
    """The clock's time: one second later at each reading."""
    now = iter(range(1000))
    monkeypatch.setattr(startup.time, "perf_counter", lambda: float(next(now)))


def test_a_phase_inside_another_is_left_out_of_it_and_the_rest_is_other(ticks):
    clock = StartupClock()  # 0
    with clock.phase("outer"):  # 1 .. 6
        with clock.phase("inner"):  # 2 .. 3
            pass
        with clock.phase("inner"):  # 4 .. 5: added to the first
            pass
    with clock.phase("after"):  # 7 .. 8
        pass
    assert clock.seconds() == {"outer": 3.0, "inner": 2.0, "after": 1.0}
    assert clock.summary() == {"outer": 3.0, "inner": 2.0, "after": 1.0, "other": 3.0, "total": 9.0}


def test_first_item_times_the_wait_for_the_first_item_alone(ticks):
    clock = StartupClock()
    items = clock.first_item("first", iter("abc"))
    assert clock.seconds() == {}  # nothing asked for yet
    assert next(items) == "a" and clock.seconds() == {"first": 1.0}
    assert list(items) == ["b", "c"] and clock.seconds() == {"first": 1.0}
    assert list(clock.first_item("none", iter(()))) == [] and "none" in clock.seconds()


def test_the_line_names_each_phase_in_order():
    seconds = {"index": 1.21, "engine": 0.8, "model": 0.3, "dali_graph": 0.94, "first_step": 2.1, "other": 0.4}
    assert startup_line({**seconds, "total": 5.75}) == (
        "start-up: index 1.2 s, engine 0.8 s, model 0.3 s, DALI graph 0.9 s, first step 2.1 s, other 0.4 s "
        "(5.8 s to the end of the first step)"
    )


@pytest.mark.strict_device  # GPU-relevant: make test's strict-device pass and the GPU check run it
def test_a_run_records_and_says_its_start_up_once(demo_data, tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        *[sys.executable, "-m", "dali_ba.train", "--recipe", "pipelines/demo.toml", "--output", str(out)],
        *["--train", str(demo_data / "train"), "--val", str(demo_data / "val")],
        *["--batch-size", "16", "--views", "2", "--epochs", "1", "--max-steps", "3", "--log-every", "1"],
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows[:3]] == ["start", "startup", "step"]  # the start-up's record right after step 1
    (start,) = [r for r in rows if r["kind"] == "start"]
    (record,) = [r for r in rows if r["kind"] == "startup"]
    seconds = record["startup_s"]
    assert record["step"] == 1 and list(seconds) == [*PHASES, "other", "total"]
    assert all(isinstance(value, float) and value >= 0 for value in seconds.values()), seconds
    assert seconds["total"] >= sum(seconds[name] for name in PHASES)
    assert sum(seconds[name] for name in [*PHASES, "other"]) == pytest.approx(seconds["total"], abs=1e-5)
    assert start["startup_s"] == {name: seconds[name] for name in ("engine", "index", "model")}  # those done by then
    lines = done.stdout.splitlines()
    said = [line for line in lines if line.startswith("start-up:")]
    assert len(said) == 1 and (found := LINE.fullmatch(said[0])), done.stdout
    assert float(found.group(1)) == pytest.approx(seconds["total"], abs=0.051)
    assert lines.index(said[0]) < lines.index(next(line for line in lines if line.startswith("step 1/3")))
