"""dali-ba reproduce in its quick mode (tiny data, a few steps), and the digits data set."""

import json
import sys

import pytest
from conftest import run_cli
from PIL import Image

from dali_ba.data.dataset import load_dataset
from dali_ba.data.digits import write_digits
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


def test_quick_reproduction_writes_figures_numbers_and_report(tmp_path):
    out = tmp_path / "paper"
    done = run_cli(*REPRODUCE, "--quick", "--seeds", "0", "--out", str(out), timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
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


def test_reproduce_bad_input_is_one_line(tmp_path):
    done = run_cli(*REPRODUCE, "--epochs", "1", "--out", str(tmp_path / "x"), timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == "dali-ba reproduce: error: --epochs must be >= 2, got 1"
    assert not (tmp_path / "x").exists()
