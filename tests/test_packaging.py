"""The package as a user installs it: a wheel with the named recipes, run from another folder."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from dali_ba.errors import UsageError
from dali_ba.recipe import find_recipe, load_recipe, recipe_names


def test_named_recipes_are_found_by_name_and_paths_still_work():
    assert {"demo", "imagenet_resnet50_ba", "cifar10_resnet44_ba"} <= set(recipe_names())
    assert find_recipe("demo") == find_recipe("demo.toml") == REPO / "pipelines" / "demo.toml"
    assert load_recipe("demo").data.view_size == 32
    assert find_recipe(str(REPO / "pipelines" / "demo.toml")) == REPO / "pipelines" / "demo.toml"
    with pytest.raises(UsageError, match="recipe not found: nope .*one of the named recipes: .*demo"):
        find_recipe("nope")
    with pytest.raises(UsageError, match="recipe not found: some/where.toml"):
        find_recipe("some/where.toml")


def test_installed_wheel_trains_a_named_recipe_from_another_folder(demo_data, tmp_path):
    source = tmp_path / "source"  # build from a copy: pip writes build/ and egg-info beside the sources
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("dali_ba", "pipelines"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(source),
            "-w",
            str(wheels),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("dali_ba-*.whl")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert (site / "dali_ba" / "pipelines" / "demo.toml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    where = subprocess.run(
        [sys.executable, "-c", "import dali_ba; print(dali_ba.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip() == str(site / "dali_ba" / "__init__.py")  # the installed copy, not the checkout
    done = subprocess.run(
        [
            str(site / "bin" / "dali-ba-train"),
            "--recipe",
            "demo",
            "--train",
            str(demo_data / "train"),
            "--val",
            str(demo_data / "val"),
            "--output",
            "run",
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--batch-size",
            "16",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    start = json.loads((elsewhere / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert (start["kind"], start["view_size"], start["arch"]) == ("start", 32, "resnet20")  # the demo recipe's
