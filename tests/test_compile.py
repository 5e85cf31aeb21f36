"""--compile: torch.compile (inductor, which builds its CPU kernels with gcc) wraps the training forward
only; what the run saves is the bare model's, loadable into a fresh uncompiled one, and the weights
are those an uncompiled run (here also --deterministic) trains.

Inductor's first compile of ResNet-20's forward and backward costs about a minute of CPU here (about
two on 2 busy cores); its kernels are cached (``/tmp/torchinductor_<user>``), so a later run of this
test takes about 20 s."""

import json

import pytest
import torch
from conftest import run_cli

from dali_ba.training.models import create_model

FLAGS = [
    "--recipe",
    "pipelines/demo.toml",
    "--max-steps",
    "2",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--views",
    "2",
    "--decoder",
    "cpu",
    "--torch-threads",
    "2",
]


def train(demo_data, output, *extra):
    done = run_cli(
        "python",
        "-m",
        "dali_ba.train",
        *FLAGS,
        "--train",
        str(demo_data / "train"),
        "--val",
        str(demo_data / "val"),
        "--output",
        str(output),
        *extra,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_a_compiled_run_saves_the_bare_models_weights(demo_data, tmp_path):
    compiled = train(demo_data, tmp_path / "compiled", "--compile")
    (start,) = [r for r in compiled if r["kind"] == "start"]
    assert (start["compile"], start["deterministic"]) == (True, False)
    saved = torch.load(tmp_path / "compiled" / "model.pt", weights_only=True)
    assert not any(key.startswith("_orig_mod.") for key in saved)
    model = create_model("resnet20", 10)
    model.load_state_dict(saved)  # strict: every key, none prefixed
    (checkpoint,) = (tmp_path / "compiled" / "checkpoints").glob("*.pt")
    assert torch.load(checkpoint, weights_only=False)["model"].keys() == saved.keys()
    environment = json.loads((tmp_path / "compiled" / "environment.json").read_text())
    assert environment["decoder"] == "cpu" and environment["hw_decoder_load"] is None  # no split on the CPU

    plain = train(
        demo_data, tmp_path / "plain", "--deterministic"
    )  # and the whole run under torch's deterministic mode
    assert [(r["compile"], r["deterministic"]) for r in plain if r["kind"] == "start"] == [(False, True)]
    expected = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    losses = [[r["loss"] for r in run if r["kind"] == "step"] for run in (compiled, plain)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)  # the second step's forward: after the same update
    for key, value in expected.items():  # the same two SGD steps, up to the fused kernels' summation order
        torch.testing.assert_close(saved[key], value, rtol=1e-2, atol=1e-3, msg=key)  # (BN biases: ~1e-4 of ~1e-3)
