"""dali-ba plot: figures from metrics.jsonl files written as train_spec.md describes them."""

import json
import math
import sys

import pytest
from conftest import run_cli
from PIL import Image

from dali_ba.tools.plot import ema, error_figure, grad_norm_figure, label_runs, load_run, throughput_figure

PLOT = [sys.executable, "-m", "dali_ba", "plot"]
PHASES = ("data", "h2d", "forward_backward", "allreduce_step")


def timing(step_time: float, data: float) -> dict:
    parts = {
        "data": data,
        "h2d": 0.001,
        "forward_backward": 0.7 * (step_time - data),
        "allreduce_step": 0.3 * (step_time - data) - 0.001,
    }
    parts["step"] = step_time
    return {
        k: {"mean": v, "std": 0.05 * v, "min": 0.9 * v, "max": 1.1 * v, "slowest_rank": 1} for k, v in parts.items()
    }


def write_run(
    folder, views, batch, *, epochs=4, steps_per_epoch=5, grad_norm=False, start=True, summary=True, step_time=0.5
):
    """A 2-rank run's metrics.jsonl: errors falling faster with larger M, steps slower with larger M."""
    folder.mkdir(parents=True)
    records = []
    if start:
        records.append(
            dict(
                kind="start",
                arch="resnet20",
                ranks=2,
                views=views,
                batch_size=batch,
                view_size=32,
                device="cpu",
                decoder="cpu",
                epochs=epochs,
                steps_per_epoch=steps_per_epoch,
                lr=0.1,
                regime="ba",
                resumed_from=None,
            )
        )
    else:  # an older run: M and B only in its recipe
        (folder / "recipe.toml").write_text(
            f"[data]\nviews = {views}\nbatch_size = {batch}\n\n[model]\narch = 'resnet20'\n"
        )
    wall, step = 0.0, 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            step += 1
            wall += step_time * views / 4
            record = dict(
                kind="step",
                epoch=epoch,
                step=step,
                wall=wall,
                loss=2.3 * math.exp(-0.05 * step * views),
                lr=0.1,
                time=timing(step_time * views / 4, 0.01),
            )
            if grad_norm:
                record["grad_norm"] = 3.0 / math.sqrt(views) * math.exp(-0.03 * step)
            records.append(record)
        wall += 1.0  # validation
        top1 = 100 - 90 * math.exp(-0.3 * (epoch + 1) * (1 + 0.1 * views))
        records.append(
            dict(
                kind="epoch",
                epoch=epoch,
                train_loss=1.0 / (epoch + 1),
                train_top1=min(100.0, top1 + 5),
                val_loss=1.2 / (epoch + 1),
                top1=top1,
                top5=min(100.0, top1 + 20),
                val_samples=200,
                epoch_time=steps_per_epoch * step_time * views / 4 + 1.0,
                wall=wall,
                steps_per_s=4 / (step_time * views),
                images_per_s=4 * batch / (step_time * views),
                views_per_s=4 * batch / step_time,
            )
        )
    if summary:
        rate = 4 / (step_time * views)
        records.append(
            dict(
                kind="summary",
                epochs=epochs,
                steps=step,
                ranks=2,
                views=views,
                batch_size=batch,
                top1=records[-1]["top1"],
                top5=records[-1]["top5"],
                val_loss=0.3,
                steps_per_s=rate,
                steps_per_s_std=0.1 * rate,
                images_per_s=rate * batch,
                images_per_s_std=0.1 * rate * batch,
                views_per_s=rate * batch * views,
                views_per_s_std=0.1 * rate * batch * views,
                timing={k: {"mean": 0.1, "std": 0.01} for k in (*PHASES, "step")},
                wall_time=wall,
                param_digests=["ab", "ab"],
                params_identical=True,
            )
        )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def assert_png(path):
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_sweep_writes_every_figure(tmp_path):
    m1 = write_run(tmp_path / "m1", 1, 64, grad_norm=True)
    m4 = write_run(tmp_path / "m4", 4, 64, start=False)  # labelled from recipe.toml
    out = tmp_path / "figures"
    done = run_cli(*PLOT, str(m1), str(m4), "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stderr
    names = {"error_vs_epoch.png", "error_vs_time.png", "grad_norm.png", "steps_per_s.png"}
    assert {p.name for p in out.iterdir()} == names
    for name in names:
        assert_png(out / name)
    assert "M=1, B=64" in done.stdout and "M=4, B=64" in done.stdout
    assert not list(m1.glob("*.png"))  # --out was given


def test_figures_show_the_records(tmp_path):
    runs = [
        load_run(write_run(tmp_path / "a", 1, 32, grad_norm=True)),
        load_run(write_run(tmp_path / "b", 8, 32, summary=False)),
    ]
    label_runs(runs)
    expected_val = [100 - e["top1"] for e in runs[1].epochs]

    (ax,) = error_figure(runs, "epoch").axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"M=1, B=32 validation", "M=1, B=32 training", "M=8, B=32 validation", "M=8, B=32 training"}
    assert list(lines["M=8, B=32 validation"].get_xdata()) == [1, 2, 3, 4]
    assert list(lines["M=8, B=32 validation"].get_ydata()) == pytest.approx(expected_val)
    assert lines["M=8, B=32 training"].get_linestyle() == "--" and ax.get_xlabel() == "epoch"

    (ax,) = error_figure(runs, "time").axes
    line = next(line for line in ax.get_lines() if line.get_label() == "M=8, B=32 validation")
    assert list(line.get_xdata()) == pytest.approx([e["wall"] for e in runs[1].epochs])
    assert ax.get_xlabel() == "wall-clock time (s)"

    (ax,) = grad_norm_figure(runs).axes
    assert [line.get_label() for line in ax.get_lines()] == ["M=1, B=32"]  # run b has no grad_norm
    assert len(ax.get_lines()[0].get_xdata()) == 20

    (ax,) = throughput_figure(runs).axes
    heights = [bar.get_height() for bar in ax.patches]
    # a: the summary's steps/s; b (no summary): the mean over its epochs
    assert heights == pytest.approx([runs[0].summary["steps_per_s"], runs[1].epochs[0]["steps_per_s"]])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["M=1, B=32", "M=8, B=32"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["M=1, B=32", "M=8, B=32"]


def test_smoothed_gradient_norm_is_an_ema_of_the_records(tmp_path):
    assert ema([1.0, 2.0, 4.0], 0.0) == [1.0, 2.0, 4.0]
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])  # bias-corrected: starts at the data
    run = load_run(write_run(tmp_path / "a", 4, 32, grad_norm=True))
    label_runs([run])
    raw = [s["grad_norm"] for s in run.steps]
    (ax,) = grad_norm_figure([run], smooth=0.9).axes
    faint, smoothed = ax.get_lines()
    assert list(faint.get_ydata()) == raw and faint.get_alpha() == 0.2
    assert list(smoothed.get_ydata()) == pytest.approx(ema(raw, 0.9)) and smoothed.get_label() == "M=4, B=32"
    assert max(smoothed.get_ydata()) - min(smoothed.get_ydata()) < max(raw) - min(raw)  # it does smooth
    done = run_cli(*PLOT, str(run.path), "--smooth", "1.5", timeout=60)
    assert done.returncode == 2 and "--smooth must be in [0, 1), got 1.5" in done.stderr


def test_same_m_and_b_are_told_apart_by_folder(tmp_path):
    runs = [load_run(write_run(tmp_path / name, 4, 64)) for name in ("ranks2", "ranks4")]
    label_runs(runs)
    assert [r.label for r in runs] == ["M=4, B=64 (ranks2)", "M=4, B=64 (ranks4)"]


def test_resumed_run_keeps_the_last_record_of_each_epoch(tmp_path):
    folder = write_run(tmp_path / "r", 2, 16)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    again = json.loads(next(line for line in lines if '"kind": "epoch"' in line))
    again["top1"] = 55.0
    (folder / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(again)]) + "\n")
    run = load_run(folder)
    assert len(run.epochs) == 4 and run.epochs[0]["top1"] == 55.0


def test_default_out_is_the_first_run_and_grad_norm_needs_data(tmp_path):
    run = write_run(tmp_path / "only", 2, 16)
    done = run_cli(*PLOT, str(run), timeout=120)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in run.glob("*.png")} == {"error_vs_epoch.png", "error_vs_time.png", "steps_per_s.png"}
    assert "no grad_norm" in done.stdout


BAD = {
    "missing": (lambda f: None, "metrics file not found: .*missing/metrics.jsonl"),
    "empty": (lambda f: (f / "metrics.jsonl").write_text(""), "empty/metrics.jsonl is empty"),
    "garbled": (
        lambda f: (f / "metrics.jsonl").write_text('{"kind": "start"}\n{"kind": "epo'),
        "garbled/metrics.jsonl:2: not JSON",
    ),
    "no kind": (lambda f: (f / "metrics.jsonl").write_text("[1, 2]\n"), "metrics.jsonl:1: not a metrics record"),
    "bad field": (
        lambda f: (f / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 0, "top1": "high"}\n'),
        "'top1' must be a number",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_metrics_file_is_one_line_naming_it(tmp_path, case):
    make, message = BAD[case]
    folder = tmp_path / case.replace(" ", "_")
    folder.mkdir()
    make(folder)
    done = run_cli(*PLOT, str(write_run(tmp_path / "good", 1, 8)), str(folder), timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("dali-ba plot: error: ")
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not list((tmp_path / "good").glob("*.png"))  # nothing drawn when one run is bad


def test_plots_a_real_training_run(demo_data, tmp_path):
    run = tmp_path / "m2"
    done = run_cli(
        sys.executable,
        "-m",
        "dali_ba.train",
        "--recipe",
        "pipelines/demo.toml",
        "--train",
        str(demo_data / "train"),
        "--val",
        str(demo_data / "val"),
        "--output",
        str(run),
        "--batch-size",
        "16",
        "--views",
        "2",
        "--epochs",
        "2",
        "--max-steps",
        "3",
        "--timing-warmup",
        "1",
        "--log-grad-norm",
    )
    assert done.returncode == 0, done.stderr
    drawn = run_cli(*PLOT, str(run), "--out", str(tmp_path / "figures"))
    assert drawn.returncode == 0, drawn.stderr
    for name in ("error_vs_epoch.png", "error_vs_time.png", "grad_norm.png", "steps_per_s.png"):
        assert_png(tmp_path / "figures" / name)
    loaded = load_run(run)
    assert (loaded.views, loaded.batch_size, len(loaded.epochs), len(loaded.steps)) == (2, 16, 2, 6)
    assert all(s["grad_norm"] > 0 for s in loaded.steps)
