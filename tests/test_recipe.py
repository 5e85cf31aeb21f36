import subprocess
import sys
from pathlib import Path
from typing import get_type_hints

import pytest
from conftest import run_cli

from dali_ba.errors import UsageError
from dali_ba.recipe import SECTIONS, Recipe, build_parser, load_recipe, resolve

REPO = Path(__file__).resolve().parents[1]


def parse(*argv):
    return resolve(build_parser("t", "").parse_args(list(argv)))


@pytest.mark.parametrize("name", ["demo", "imagenet_resnet50_ba"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(REPO / "pipelines" / f"{name}.toml").validate()
    assert recipe.data.views >= 1


def test_paper_imagenet_recipe():
    r = load_recipe(REPO / "pipelines/imagenet_resnet50_ba.toml")
    assert (r.model.arch, r.data.batch_size, r.data.views, r.optim.epochs) == ("resnet50", 256, 4, 90)
    assert (r.optim.lr, r.optim.lr_batch, r.optim.momentum, r.optim.weight_decay) == (0.1, 256, 0.9, 1e-4)
    assert r.optim.decay_epochs == [30, 60, 80]


def test_flags_override_the_recipe_file():
    r = parse(
        "--recipe",
        str(REPO / "pipelines/demo.toml"),
        "--views",
        "8",
        "--decay-epochs",
        "3,5",
        "--no-channels-last",
        "--lr",
        "0.2",
    )
    assert (r.data.views, r.optim.decay_epochs, r.model.channels_last, r.optim.lr) == (8, [3, 5], False, 0.2)
    assert r.data.view_size == 32  # untouched fields keep the file's value
    assert parse().data.views == Recipe().data.views  # no recipe: defaults


@pytest.mark.parametrize(
    "text, message",
    [
        ("[data]\nviewz = 4\n", "unknown key 'viewz' in \\[data\\]"),
        ("[dataa]\nviews = 4\n", "unknown table \\[dataa\\]"),
        ("[data]\nviews = 'four'\n", "\\[data\\] views must be int, got str 'four'"),
        ("[model]\nchannels_last = 1\n", "channels_last must be bool"),
        ("[data]\nbatch_size = true\n", "batch_size must be int, got bool"),
        ("[optim]\ndecay_epochs = [1, 'x']\n", "decay_epochs must be a list of integers"),
        ("[run]\nshare_gpu = 1\n", "share_gpu must be bool, got int 1"),
        ("[data\n", "not valid TOML"),
    ],
)
def test_bad_recipe_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_recipe(path)


def test_int_accepted_for_float(tmp_path):
    (tmp_path / "r.toml").write_text("[optim]\nlr = 1\n")
    assert load_recipe(tmp_path / "r.toml").optim.lr == 1.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--views", "0"], "--views \\(\\[data\\] views\\) must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size .* must be >= 1"),
        (["--crop-area-min", "1.5"], "crop_area_min"),
        (
            ["--augment", "autoaugment"],
            r"--augment \(\[data\] augment\) must be one of imagenet, cifar, trivial, randaugment, got 'autoaugment'",
        ),
        (["--randaugment-m", "31"], r"--randaugment-m \(\[data\] randaugment_m\) must be in \[0, 30\], got 31"),
        (["--randaugment-n", "0"], r"randaugment_n\) must be in \[1, 16\], got 0"),
        (["--amp", "fp8"], "amp"),
        (["--val-crop", "300"], "val_resize"),
        (["--chunks", "5000"], "more than the B\\*M"),
        (
            ["--hw-decoder-load", "1.5"],
            r"^--hw-decoder-load \(\[data\] hw_decoder_load\) must be between 0 and 1, got 1.5$",
        ),
        (["--hw-decoder-load", "-0.1"], "hw_decoder_load.* must be between 0 and 1"),
        (
            ["--hw-decoder-load", "nan"],
            r"^--hw-decoder-load \(\[data\] hw_decoder_load\) must be a finite number, got nan$",
        ),
    ],
)
def test_out_of_range_values(argv, message):
    with pytest.raises(UsageError, match=message):
        parse(*argv)


FLOAT_KEYS = [
    (section, name) for section, cls in SECTIONS.items() for name, kind in get_type_hints(cls).items() if kind is float
]


@pytest.mark.parametrize("section, name", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_and_recipe_key_refuses_nan_and_infinity(tmp_path, section, name, value):
    """NaN passes every range check (a NaN --lr trained and saved NaN weights); infinity means nothing here."""
    flag = f"--{name.replace('_', '-')}"
    with pytest.raises(UsageError, match=rf"^{flag} \(\[{section}\] {name}\) must be a finite number, got {value}$"):
        parse(f"{flag}={value}")  # -inf would read as a flag
    (tmp_path / "r.toml").write_text(f"[{section}]\n{name} = {value}\n")
    with pytest.raises(UsageError, match=rf"^{flag} \(\[{section}\] {name}\) must be a finite number, got {value}$"):
        parse("--recipe", str(tmp_path / "r.toml"))


@pytest.mark.parametrize(
    "tool, flag",
    [
        (["dali_ba.tools.plot", "."], "--smooth"),
        (["dali_ba.tools.profile", "pipeline"], "--crop-area-min"),
        (["dali_ba.doctor"], "--timeout"),
    ],
)
def test_the_tools_float_flags_refuse_nan_in_one_line(tool, flag):
    done = run_cli(sys.executable, "-m", *tool, flag, "nan", timeout=120)
    assert done.returncode == 2 and done.stderr.strip().endswith(f"argument {flag}: must be a finite number, got nan")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_missing_recipe_file():
    with pytest.raises(UsageError, match="recipe not found: nope.toml"):
        parse("--recipe", "nope.toml")


def test_share_gpu_is_off_unless_asked(tmp_path):
    assert parse().run.share_gpu is False
    assert parse("--share-gpu").run.share_gpu is True
    (tmp_path / "r.toml").write_text("[run]\nshare_gpu = true\n")
    assert load_recipe(tmp_path / "r.toml").run.share_gpu is True
    assert parse("--recipe", str(tmp_path / "r.toml"), "--no-share-gpu").run.share_gpu is False


def test_help_shows_every_flag_and_a_literal_percent_sign():
    """argparse %-formats help texts: a bare % in one crashed --help."""
    text = " ".join(build_parser("t", "").format_help().split())
    assert "-1: 1% of the training files" in text and "--share-gpu" in text
    done = subprocess.run(
        [sys.executable, "-m", "dali_ba.train", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0 and "--max-bad-files" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize(
    "flag, table, key, default",
    [
        ("--deterministic", "run", "deterministic", False),
        ("--compile", "model", "compile", False),
    ],
)
def test_the_gpu_contract_switches_are_off_unless_asked(tmp_path, flag, table, key, default):
    assert getattr(getattr(parse(), table), key) is default
    assert getattr(getattr(parse(flag), table), key) is True
    (tmp_path / "r.toml").write_text(f"[{table}]\n{key} = true\n")
    assert getattr(getattr(load_recipe(tmp_path / "r.toml"), table), key) is True
    no = "--no-" + flag.removeprefix("--")
    assert getattr(getattr(parse("--recipe", str(tmp_path / "r.toml"), no), table), key) is False
    (tmp_path / "bad.toml").write_text(f"[{table}]\n{key} = 1\n")
    with pytest.raises(UsageError, match=f"{key} must be bool, got int 1"):
        load_recipe(tmp_path / "bad.toml")


def test_the_hardware_decoder_share_is_written_out(tmp_path):
    """0.65 whatever DALI's own default (0.90 in some releases): the split is the recipe's, not the install's."""
    from dali_ba.loading.feed import DEFAULT_HW_DECODER_LOAD

    assert parse().data.hw_decoder_load == DEFAULT_HW_DECODER_LOAD == 0.65
    assert parse("--hw-decoder-load", "0.9").data.hw_decoder_load == 0.9
    (tmp_path / "r.toml").write_text("[data]\nhw_decoder_load = 1\n")  # an int is a float here
    assert load_recipe(tmp_path / "r.toml").validate().data.hw_decoder_load == 1.0


def test_the_region_decode_is_on_unless_turned_off(tmp_path):
    """Every view loader of a run decodes only its views' regions, unless --no-roi-decode (or
    [data] roi_decode = false) asks for whole images."""
    assert parse().data.augmentation()["roi_decode"] is True
    assert parse("--no-roi-decode").data.augmentation()["roi_decode"] is False
    recipe = tmp_path / "whole.toml"
    recipe.write_text("[data]\nroi_decode = false\n")
    assert parse("--recipe", str(recipe)).data.augmentation()["roi_decode"] is False
    assert parse("--recipe", str(recipe), "--roi-decode").data.augmentation()["roi_decode"] is True
