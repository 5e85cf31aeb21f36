"""dali-ba reproduce in its quick mode (tiny data, a few steps), and the digits data set."""

import json
import sys
from pathlib import Path

import pytest
from conftest import run_cli, tail
from PIL import Image

from dali_ba.data.dataset import load_dataset
from dali_ba.data.digits import write_digits
from dali_ba.tools.reproduce import between_machines, comparison_lines
from dali_ba.training.step_clock import PHASES

REPRODUCE = [sys.executable, "-m", "dali_ba", "reproduce"]


def test_digits_are_real_scans_as_stratified_jpeg_folders(tmp_path):
    write_digits(tmp_path, train=100, val=50, size=32, seed=0)
    train, val = load_dataset(tmp_path / "train"), load_dataset(tmp_path / "val")
    assert len(train) == 100 and len(val) == 50 and list(train.classes) == [str(c) for c in range(10)]
    assert sorted(set(train.labels)) == list(range(10)) and min(train.labels.count(c) for c in range(10)) == 10
    assert not set(train.files) & set(val.files)
    with Image.open(train.files[0]) as image:
        assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"
        assert len(set(image.getdata())) > 10  # a scan, not a flat colour


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paper") / "paper"
    done = run_cli(*REPRODUCE, "--quick", "--seeds", "0", "--out", str(out), timeout=400)
    assert done.returncode == 0, tail(done)
    return out


def test_quick_reproduction_writes_figures_numbers_and_report(quick):
    out = quick
    names = {
        "fig2_synthetic.png",
        "fig2_digits.png",
        "fig3_synthetic.png",
        "fig3_digits.png",
        "fig4_synthetic.png",
        "fig4_digits.png",
        "fig5.png",
    }
    assert names <= {p.name for p in out.iterdir()}
    for name in names:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300
    saved = json.loads((out / "results.json").read_text())
    for dataset in ("synthetic", "digits"):
        views = saved["results"][dataset]["views"]
        assert set(views) == {"1", "2", "4"}
        for m in views.values():
            assert 0 <= m["final_error"]["mean"] <= 100 and m["late_grad_norm"]["mean"] > 0
            assert m["steps_per_s"]["mean"] > 0 and set(m["eval"]) == {"plain", "views", "calibrated"}
        for m in views.values():  # the step's parts add up to it; how step times compare across M: benchmarks
            phases = m["phases_ms"]
            assert phases["step"]["mean"] > 0 and set(phases) == {*PHASES, "step"}
            assert sum(phases[p]["mean"] for p in PHASES) == pytest.approx(phases["step"]["mean"], rel=0.01)
        assert saved["results"][dataset]["ra"]["epochs"] == 4 * 2  # regime adaptation: M x the epochs
        for figure in ("fig2", "fig3", "fig4", "fig5", "eval"):
            verdict = saved["verdicts"][figure][dataset]
            assert figure == "eval" or verdict.startswith(("held", "did not hold"))
    report = (out / "REPORT.md").read_text()
    assert report.count("## Figure") == 4 and "mean ± std over the seeds" in report
    assert "![fig5.png](fig5.png)" in report and "BatchNorm recalibration" in report
    machine = saved["machine"]  # what the numbers were measured on, in the report too
    assert machine["cpu"] and machine["cores"] >= 1 and machine["cpu_capability"] and machine["versions"]["torch"]
    assert (
        f"Measured on {machine['cpu']}, {machine['cores']} cores, torch CPU kernels {machine['cpu_capability']}"
        in report
    )
    assert len(saved["digests"]) == 2 * 4 and saved["between_machines"] is None  # M = 1, 2, 4 and RA, per data set


def test_a_second_run_on_this_machine_gives_the_same_parameters_and_says_so(quick, tmp_path):
    out = tmp_path / "again"
    done = run_cli(*REPRODUCE, "--quick", "--seeds", "0", "--out", str(out), "--compare", str(quick / "results.json"))
    assert done.returncode == 0, tail(done)
    compared = json.loads((out / "results.json").read_text())["between_machines"]
    assert compared["identical_parameters"] == compared["compared_parameters"] == 8
    assert {d["max_move"] for d in compared["datasets"].values()} == {0.0}
    for figure, by_dataset in compared["verdicts"].items():  # fig5's verdict is timing's: it may move
        assert figure == "fig5" or all(v["here"] == v["there"] for v in by_dataset.values()), figure
    report = (out / "REPORT.md").read_text()
    assert "## Between machines" in report and "Parameters identical bit for bit in 8 of 8 runs." in report
    first = json.loads((quick / "results.json").read_text())["machine"]
    assert f"Against `{quick / 'results.json'}`, measured on {first['cpu']}" in report


def test_a_report_without_a_machine_compares_by_its_numbers(quick, tmp_path):
    """The reports committed before this one name no machine and keep no digests: their numbers still compare."""
    saved = json.loads((quick / "results.json").read_text())
    old = json.loads(json.dumps({key: saved[key] for key in ("plan", "results", "verdicts")}))  # a copy
    old["results"]["digits"]["views"]["2"]["final_error"]["values"][0] += 3.0
    compared = between_machines(saved, old)
    assert compared["other_machine"] is None and compared["compared_parameters"] == 0
    assert compared["datasets"]["digits"]["max_move"] == pytest.approx(3.0)
    assert compared["datasets"]["synthetic"]["max_move"] == 0.0
    lines = comparison_lines(compared, Path("old/results.json"))
    assert "a machine it does not record" in lines[2] and not any("bit for bit" in line for line in lines)


def test_reproduce_bad_input_is_one_line(tmp_path):
    done = run_cli(*REPRODUCE, "--epochs", "1", "--out", str(tmp_path / "x"), timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == "dali-ba reproduce: error: --epochs must be >= 2, got 1"
    assert not (tmp_path / "x").exists()
    (tmp_path / "other.json").write_text('{"plan": {}}')
    done = run_cli(*REPRODUCE, "--compare", str(tmp_path / "other.json"), "--out", str(tmp_path / "y"), timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"dali-ba reproduce: error: --compare {tmp_path / 'other.json'}: not a results.json of dali-ba reproduce "
        "(no results and verdicts)"
    )
    assert not (tmp_path / "y").exists()
