"""--arch for any classifier (dali_ba/training/models.py): the paper's CIFAR networks at their published
sizes, a torchvision model, a timm model and a user's factory trained under both launchers and resumed
exactly, the new recipes, and every bad --arch as one line."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from dali_ba.errors import UsageError
from dali_ba.recipe import find_recipe, load_recipe
from dali_ba.training import models
from dali_ba.training.models import check_model_name, create_model

PY = sys.executable
TRAIN = ["-m", "dali_ba.train", "--recipe", "pipelines/demo.toml"]
MPIRUN = ["mpirun", "-np", "2", *(["--allow-run-as-root"] if os.geteuid() == 0 else []), PY]
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
FACTORY = """import torch.nn as nn


def build(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))


def not_a_model(num_classes):
    return "a string"


def broken(num_classes):
    raise ValueError("no such width")
"""

# (arch, million parameters for 10 classes, the published figure where there is one)
PAPER_SIZES = [
    ("resnet44", 0.66),
    ("wrn28_10", 36.5),
    ("densenet_bc_100_12", 0.8),
    ("vgg16_cifar", 33.6),
]  # VGG-16: ours, with the authors 2 x 4096 classifier


@pytest.mark.parametrize("arch, millions", PAPER_SIZES)
def test_the_papers_cifar_networks_have_their_published_size_and_train_a_step(arch, millions):
    torch.manual_seed(0)
    model = create_model(arch, 10, dropout=0.3 if arch == "wrn28_10" else 0.0)
    count = sum(p.numel() for p in model.parameters())
    assert count / 1e6 == pytest.approx(millions, rel=0.05), count  # DenseNet-BC-100-12: 0.769 M ("0.8 M")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def args(demo_data, output, arch, *extra):
    return [
        "--train",
        str(demo_data / "train"),
        "--val",
        str(demo_data / "val"),
        "--output",
        str(output),
        "--arch",
        arch,
        "--batch-size",
        "8",
        "--views",
        "2",
        "--max-steps",
        "1",
        "--log-every",
        "1",
        "--deterministic",
        *extra,
    ]


def digest(output: Path) -> list[str]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "summary"][-1]["param_digests"]


@pytest.fixture(scope="module")
def factory_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("factory")
    (folder / "user_nets.py").write_text(FACTORY)
    return folder


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "timm:resnet10t", "user_nets:build"])
def test_any_model_trains_under_both_launchers_and_resumes_exactly(arch, demo_data, factory_path, tmp_path):
    """Two steps under mpirun (Horovod); the same two under torchrun as one step, a stop, and --resume
    auto: the same parameters (two ranks' sums do not depend on the engine)."""
    env = {"PYTHONPATH": str(factory_path)}  # the user's module, as installed packages would be
    whole = run_cli(*MPIRUN, *TRAIN, *args(demo_data, tmp_path / "whole", arch, "--epochs", "2"), env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "resumed"
    first = run_cli(*TORCHRUN, *TRAIN, *args(demo_data, out, arch, "--epochs", "1"), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(*TORCHRUN, *TRAIN, *args(demo_data, out, arch, "--epochs", "2", "--resume", "auto"), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert digest(out) == digest(tmp_path / "whole") and len(set(digest(out))) == 1
    if arch == "user_nets:build":  # another arch refuses the checkpoint (once: set-up alone, but two ranks)
        other = run_cli(*TORCHRUN, *TRAIN, *args(demo_data, out, "resnet20", "--epochs", "3", "--resume", "auto"))
        assert other.returncode != 0 and f"was written with arch = {arch!r}, this run has 'resnet20'" in other.stderr


@pytest.mark.parametrize(
    "arch, message",
    [
        ("vgg17", "unknown model 'vgg17' (--arch): not one of the paper's CIFAR networks"),
        ("timm:no_such_net", "--arch timm:no_such_net: timm "),
        ("no_such_module:build", "--arch no_such_module:build: cannot import no_such_module (ModuleNotFoundError"),
        ("user_nets:missing", "--arch user_nets:missing: user_nets has no function 'missing'"),
        (
            "user_nets:not_a_model",
            "--arch user_nets:not_a_model: not_a_model(num_classes=10) returned a str, not a torch.nn.Module",
        ),
        ("user_nets:broken", "--arch user_nets:broken: broken(num_classes=10) failed (ValueError: no such width)"),
    ],
)
def test_a_bad_arch_is_one_line(arch, message, factory_path, monkeypatch):
    monkeypatch.syspath_prepend(str(factory_path))
    with pytest.raises(UsageError, match="^" + re.escape(message)):
        create_model(arch, 10)


def test_timm_missing_is_one_line_naming_the_package(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(
        UsageError, match=r"^--arch timm:resnet10t needs the timm package, which is not installed: pip install timm$"
    ):
        check_model_name("timm:resnet10t")


def test_a_model_built_for_another_input_size_is_one_line_at_set_up(demo_data, tmp_path):
    done = run_cli(PY, *TRAIN, *args(demo_data, tmp_path / "run", "vit_b_16"), timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        "python -m dali_ba.train: error: --arch vit_b_16 cannot take 32x32 px views (--view-size 32): "
    )


def test_a_validation_crop_the_model_cannot_take_is_one_line_at_set_up(demo_data, tmp_path):
    """AlexNet takes 64 px training views but not the demo's 32 px validation crop: found before the
    first step, not as a traceback in the first evaluation after a whole epoch."""
    out = tmp_path / "run"
    done = run_cli(PY, *TRAIN, *args(demo_data, out, "alexnet", "--view-size", "64"), timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        "python -m dali_ba.train: error: --arch alexnet cannot take 32x32 px inputs (--val-crop 32): "
    )
    assert not (out / "metrics.jsonl").exists() or '"kind": "step"' not in (out / "metrics.jsonl").read_text()


def test_the_input_check_tries_each_size_once_and_names_the_flag_that_set_it():
    seen = []
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[-1]))
    models.check_input_size(model, "m", [(32, "--view-size"), (32, "--val-crop"), (48, "--val-crop")], "cpu")
    assert seen == [32, 48] and model.training  # each size once; the model's mode is left as it was
    with pytest.raises(UsageError, match=r"^--arch m cannot take 2x2 px inputs \(--val-crop 2\): "):
        models.check_input_size(model, "m", [(32, "--view-size"), (2, "--val-crop")], "cpu")
    with pytest.raises(UsageError, match=r"^--arch m cannot take 1x1 px views \(--view-size 1\): "):
        models.check_input_size(model, "m", [(1, "--view-size"), (1, "--val-crop")], "cpu")


def test_list_archs_names_every_source():
    done = run_cli(PY, "-m", "dali_ba.train", "--list-archs")
    assert done.returncode == 0, done.stderr
    assert "vgg16_cifar wrn28_10 densenet_bc_100_12" in done.stdout
    assert " alexnet " in done.stdout and " mobilenet_v2 " in done.stdout and " vit_b_16 " in done.stdout
    assert "timm:<name>: " in done.stdout and "models of timm" in done.stdout


RECIPES = [
    "cifar10_vgg16_ba",
    "cifar10_wrn28_10_ba",
    "cifar10_densenet_bc_ba",
    "imagenet_alexnet_ba",
    "imagenet_mobilenet_ba",
]


@pytest.mark.parametrize("name", RECIPES)
def test_the_papers_table_1_recipes_load_and_pass_the_checks(name):
    recipe = load_recipe(find_recipe(name)).validate()
    check_model_name(recipe.model.arch)
    assert recipe.data.batch_size >= 64 and recipe.optim.epochs > 1


def test_a_cifar_recipe_trains_a_capped_epoch_on_the_demo_data(demo_data, tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        PY,
        "-m",
        "dali_ba.train",
        "--recipe",
        "cifar10_vgg16_ba",
        "--train",
        str(demo_data / "train"),
        "--val",
        str(demo_data / "val"),
        "--output",
        str(out),
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--views",
        "2",
        "--dali-threads",
        "1",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(set(digest(out))) == 1
