"""python -m dali_ba.train end to end: one process, horovodrun and mpirun, and its bad inputs."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, REPO, run_cli

from dali_ba.distributed.world import World
from dali_ba.loading.loader import ValidationLoader
from dali_ba.recipe import load_recipe
from dali_ba.training.evaluation import evaluate
from dali_ba.training.models import create_model
from dali_ba.training.step_clock import PHASES

pytestmark = pytest.mark.strict_device  # GPU-relevant: make test's strict-device pass and the GPU check run it

PY = sys.executable
TRAIN = [PY, "-m", "dali_ba.train", "--recipe", "pipelines/demo.toml"]


def small_run(demo_data, output, *extra):
    return ["--train", str(demo_data / "train"), "--val", str(demo_data / "val"), "--output", str(output), *extra]


def records(output, kind):
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_training_loss_falls_on_demo_data(demo_data, tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        *TRAIN,
        *small_run(
            demo_data,
            out,
            "--batch-size",
            "32",
            "--views",
            "2",
            "--epochs",
            "4",
            "--lr",
            "0.2",
            "--lr-batch",
            "32",
            "--warmup-epochs",
            "0",
            "--decay-epochs",
            "",
            "--log-every",
            "2",
        ),
    )
    assert done.returncode == 0, done.stderr
    epochs = records(out, "epoch")
    assert len(epochs) == 4
    assert epochs[-1]["train_loss"] < 0.9 * epochs[0]["train_loss"]
    assert epochs[-1]["val_samples"] == 60
    for field in ("train_loss", "val_loss", "top1", "top5", "epoch_time", "images_per_s", "views_per_s"):
        assert isinstance(epochs[-1][field], float)
    steps = records(out, "step")
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1)) and len(steps) == 4 * 8  # every step
    assert {"epoch", "step", "loss", "lr", "wall", "time"} <= steps[0].keys() and "grad_norm" not in steps[0]
    assert all(s["lr"] == pytest.approx(0.2) for s in steps)  # LR from B=32 unique images, not B*M=64
    for s in steps:  # one rank: the phases are consecutive and make up the step
        t = s["time"]
        assert sum(t[p]["mean"] for p in PHASES) == pytest.approx(t["step"]["mean"], rel=0.01, abs=2e-5)
        assert t["forward_backward"]["mean"] > 0 and t["step"]["std"] == 0
    assert 0 <= epochs[-1]["train_top1"] <= 100 and epochs[-1]["train_top1"] > epochs[0]["train_top1"]
    (summary,) = records(out, "summary")
    assert summary["params_identical"] and summary["ranks"] == 1
    assert summary["steady_steps"] == 4 * (8 - 5)  # --timing-warmup 5 of the 8 steps of each epoch
    assert summary["images_per_s"] == pytest.approx(32 * summary["steps_per_s"])
    assert summary["views_per_s"] == pytest.approx(2 * summary["images_per_s"])
    assert "done: 4 epochs" in done.stdout and "val top-1" in done.stdout
    assert "timing over 12 steady-state steps" in done.stdout and "forward_backward" in done.stdout
    assert "step 2/32  epoch 1  loss" in done.stdout  # not a terminal: plain progress lines, every --log-every
    (start,) = records(out, "start")
    assert (start["views"], start["batch_size"], start["ranks"], start["resumed_from"]) == (2, 32, 1, None)
    environment = json.loads((out / "environment.json").read_text())
    assert environment["ranks"] == 1 and environment["versions"]["torch"] == torch.__version__.split("+")[0]
    saved = load_recipe(out / "recipe.toml")
    assert (saved.data.views, saved.data.batch_size, saved.optim.decay_epochs) == (2, 32, [])
    assert (out / "model.pt").stat().st_size > 0


LAUNCHERS = {
    "horovodrun": ["horovodrun", "-np", "2"],
    "mpirun": ["mpirun", "-np", "2", *(["--allow-run-as-root"] if os.geteuid() == 0 else [])],
}


@pytest.mark.parametrize(
    "launcher, extra",
    [
        ("horovodrun", ["--log-grad-norm", "--horovod-timeline", "TIMELINE"]),
        ("mpirun", ["--chunks", "2", "--amp", "bf16"]),
    ],
)
def test_two_ranks_end_with_identical_parameters(demo_data, tmp_path, launcher, extra):
    out = tmp_path / "run"
    timeline = tmp_path / "timeline.json"
    extra = [str(timeline) if arg == "TIMELINE" else arg for arg in extra]
    done = run_cli(
        *LAUNCHERS[launcher],
        *TRAIN,
        *small_run(demo_data, out, "--batch-size", "16", "--views", "2", "--epochs", "2", "--max-steps", "4", *extra),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (summary,) = records(out, "summary")
    assert summary["ranks"] == 2 and len(summary["param_digests"]) == 2
    assert summary["param_digests"][0] == summary["param_digests"][1]
    assert "parameters identical on 2 rank(s)" in done.stdout
    assert done.stdout.count("start-up: engine") == 1 and len(records(out, "startup")) == 1  # rank 0's alone
    # Timing is gathered from both ranks for every step.
    steps = records(out, "step")
    assert [s["step"] for s in steps] == list(range(1, 9))
    for s in steps:
        t = s["time"]
        assert sum(t[p]["mean"] for p in PHASES) == pytest.approx(t["step"]["mean"], rel=0.01, abs=2e-5)
        for stats in t.values():
            assert stats["min"] <= stats["mean"] <= stats["max"] and stats["slowest_rank"] in (0, 1)
            assert stats["std"] == pytest.approx((stats["max"] - stats["min"]) / 2, abs=2e-6)  # two ranks
    assert {r["rank"] for r in json.loads((out / "environment.json").read_text())["per_rank"]} == {0, 1}
    if "--log-grad-norm" in extra:
        assert all(s["grad_norm"] > 0 for s in steps)
        assert "ALLREDUCE" in timeline.read_text()  # Horovod's own timeline, switched on from the CLI
    else:
        assert "grad_norm" not in steps[0] and not timeline.exists()
    # Validation over 2 ranks equals one process evaluating the saved model on all 60 images.
    model = create_model("resnet20", 10).to(DEVICE)  # where the loader's batches are
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    bf16 = "bf16" in extra
    autocast = (
        (lambda: torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    )
    val = ValidationLoader(demo_data / "val", batch_size=8, resize=36, crop=32)  # the run's per-rank batch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran: same kernels, same sums
    try:
        alone = evaluate(model, val, World(0, 1, 0, 1), autocast=autocast)
    finally:
        torch.set_num_threads(threads)
    last = records(out, "epoch")[-1]
    assert alone["val_samples"] == last["val_samples"] == 60
    if bf16:  # bf16 logits tie often; a near-tie may break either way in a different batch
        assert abs(alone["top1"] - last["top1"]) <= 100 / 60 + 1e-9
    else:
        assert (alone["top1"], alone["top5"]) == (last["top1"], last["top5"])
        assert alone["val_loss"] == pytest.approx(last["val_loss"], rel=1e-4)


def make_folder(root, spec):
    for name, count in spec.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.jpg").write_bytes(b"")
    return root


BAD_INPUTS = {
    "missing data dir": (lambda p, d: ["--train", str(p / "nope")], "data directory not found: .*nope"),
    "no class folders": (lambda p, d: ["--train", str(p)], "no class folders in"),
    "empty class folder": (
        lambda p, d: ["--train", str(make_folder(p / "t", {"a": 2, "b": 0}))],
        "class folder has no images: .*b",
    ),
    "views < 1": (lambda p, d: ["--views", "0"], "--views .* must be >= 1, got 0"),
    "batch < 1": (lambda p, d: ["--batch-size", "-3"], "--batch-size .* must be >= 1, got -3"),
    "views not a number": (lambda p, d: ["--views", "four"], "argument --views: invalid int value: 'four'"),
    "unknown recipe key": (
        lambda p, d: ["--recipe", str(write(p / "r.toml", "[data]\nviewz = 2\n"))],
        "unknown key 'viewz'",
    ),
    "wrong recipe type": (
        lambda p, d: ["--recipe", str(write(p / "r.toml", "[optim]\nepochs = '9'\n"))],
        "epochs must be int, got str",
    ),
    "unknown model": (lambda p, d: ["--arch", "resnet9000"], "unknown model 'resnet9000'"),
    "output cannot be created": (
        lambda p, d: ["--output", "/proc/dali-ba-test/run"],
        "--output /proc/dali-ba-test/run: cannot create or write it",
    ),
    "output is a file": (lambda p, d: ["--output", str(write(p / "file", "x") / "run")], "cannot create or write it"),
    "views beyond memory": (
        lambda p, d: ["--view-size", "100000"],
        r"--view-size 100000 with 64 samples x M=4 views per rank: one batch of views is 7\.0 TiB "
        r"\(B\*M\*S\^2\*3\), .* more than the .* available",
    ),
}


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_clear_line(demo_data, tmp_path, case):
    make_args, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    args = small_run(demo_data, out) + make_args(tmp_path, demo_data)  # later flags win
    done = run_cli(*TRAIN, *args, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1 and "error:" in lines[0], done.stderr
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not out.exists()  # nothing started, nothing written


def test_more_ranks_than_samples(demo_data, tmp_path):
    one = tmp_path / "one" / "cls"
    one.mkdir(parents=True)
    (one / "a.jpg").write_bytes((demo_data / "train").joinpath("disc_warm", "disc_warm_0000.jpg").read_bytes())
    out = tmp_path / "out"
    done = run_cli(
        *LAUNCHERS["horovodrun"],
        *TRAIN,
        *small_run(demo_data, out, "--train", str(tmp_path / "one"), "--val", str(tmp_path / "one")),
        timeout=120,
    )
    assert done.returncode != 0
    assert "has 1 samples but there are 2 ranks" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not (out / "metrics.jsonl").exists()


def test_existing_run_is_not_overwritten(demo_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "epoch"}\n')
    done = run_cli(*TRAIN, *small_run(demo_data, out, "--epochs", "1", "--max-steps", "1"))
    assert done.returncode == 2 and "already holds a run" in done.stderr
    assert (out / "metrics.jsonl").read_text() == '{"kind": "epoch"}\n'


def test_tensorboard_holds_the_step_and_epoch_scalars(demo_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    done = run_cli(
        *TRAIN,
        *small_run(
            demo_data,
            out,
            "--batch-size",
            "16",
            "--views",
            "2",
            "--epochs",
            "2",
            "--max-steps",
            "3",
            "--log-every",
            "1",
            "--log-grad-norm",
            "--tensorboard",
        ),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/steps_per_s",
        "time/data_ms",
        "time/forward_backward_ms",
        "time/allreduce_step_ms",
        "time/step_ms",
        "epoch/top1",
        "epoch/top5",
        "epoch/val_loss",
        "epoch/train_loss",
        "epoch/steps_per_s",
    } <= tags
    steps, epochs = records(out, "step"), records(out, "epoch")
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [s["step"] for s in steps] == list(range(1, 7))
    assert [e.value for e in loss] == pytest.approx([s["loss"] for s in steps], rel=1e-6)
    assert [e.value for e in events.Scalars("train/grad_norm")] == pytest.approx(
        [s["grad_norm"] for s in steps], rel=1e-6
    )
    top1 = events.Scalars("epoch/top1")
    assert [(e.step, e.value) for e in top1] == [(e["epoch"] + 1, pytest.approx(e["top1"])) for e in epochs]


def test_tensorboard_without_the_package_is_one_line(demo_data, tmp_path):
    from test_engines import hidden

    out = tmp_path / "run"
    done = run_cli(*TRAIN, *small_run(demo_data, out, "--tensorboard"), env=hidden(tmp_path / "hide", "tensorboard"))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "python -m dali_ba.train: error: --tensorboard needs the tensorboard package: pip install tensorboard"
    ]
    assert not out.exists()


def test_make_demo_prints_one_clean_log(tmp_path):
    """make demo's launcher does not tag lines with ranks: the log reads as one process's."""
    out = tmp_path / "demo"
    done = subprocess.run(
        ["make", "demo", f"DEMO_ARGS=--epochs 1 --max-steps 2 --output {out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "dali_ba.train" not in line and line.strip()]
    ours = lines[lines.index(next(line for line in lines if line.startswith("dali-ba: engine horovod (mpi)"))) :]
    assert not any(line.startswith("[1,") for line in done.stdout.splitlines()), done.stdout[-2000:]
    assert any(line.startswith("done: 1 epochs, 2 steps") for line in ours)
    assert "parameters identical on 2 rank(s)" in done.stdout


def test_gpu_out_of_memory_is_one_line_naming_the_step_size(demo_data, tmp_path, monkeypatch, capsys):
    """A CUDA out-of-memory in a step (raised here by a stand-in step) ends the run with one line
    naming B, M and the view size and suggesting --chunks and --amp; no traceback."""
    import dali_ba.train as train
    from dali_ba.training.rank_setup import Training

    def out_of_memory(self, images, labels, clock=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Training, "step", out_of_memory)
    status = train.main(
        small_run(
            demo_data,
            tmp_path / "run",
            "--recipe",
            "pipelines/demo.toml",
            "--batch-size",
            "16",
            "--views",
            "3",
            "--view-size",
            "24",
        )
    )
    err = capsys.readouterr().err
    assert status == train.EXIT_OUT_OF_MEMORY, err
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert "out of GPU memory" in line and "--batch-size 16" in line and "--views 3 of 24x24 px" in line
    assert "--chunks" in line and "--amp bf16" in line and "Traceback" not in err


def test_batches_that_cannot_fit_on_the_gpu_are_refused(monkeypatch):
    """On a GPU the batches of views and the model's parameters are checked against the GPU's free memory (a
    stand-in here)."""
    from dali_ba.errors import UsageError
    from dali_ba.training.checks import check_memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 << 30, 80 << 30))
    check_memory(64, 4, 224, local_ranks=8, device=torch.device("cuda", 0))  # 7 x 38.5 MB fits in 2 GiB
    with pytest.raises(UsageError, match=r"one rank on GPU cuda:0 .* more than the 2\.0 GiB available"):
        check_memory(256, 16, 224, local_ranks=1, device=torch.device("cuda", 0))
    check_memory(64, 4, 224, local_ranks=8, device=torch.device("cuda", 0), parameters=100_000_000)  # + 1.49 GiB
    with pytest.raises(UsageError, match=r"the model's 120\.0 M parameters \(1\.8 GiB with gradients"):
        check_memory(64, 4, 224, local_ranks=8, device=torch.device("cuda", 0), parameters=120_000_000)
