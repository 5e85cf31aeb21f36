"""dali-ba profile views: training steps at each M, and the free views (1 and 2 ranks)."""

import json
import re

import pytest
from conftest import DECODER, DEVICE, REPO, run_cli
from PIL import Image
from test_profile import (
    DRAIN,
    PROFILE,
    STEPS,
    WARMUP,
    SoloWorld,
    on_one_and_two_ranks,
    stand_ins,  # noqa: F401 (a fixture)
    window_log,
)

from dali_ba.recipe import load_recipe
from dali_ba.tools import profile_views as views_module
from dali_ba.tools.profile import TIMING_RULE
from dali_ba.tools.profile_views import free_views

B = 30  # 240 training images: 8 steps per epoch, on 1 or 2 ranks
ROW_KEYS = {
    "views",
    "step_time",
    "step_time_std",
    "step_time_median",
    "step_time_ratio",
    "within_tolerance",
    "steps_per_s",
    "samples_per_s",
    "views_per_s",
    "data_stall",
    "data_stall_raw",
    "data_wait",
    "data_wait_share",
    "memory_step_time",
    "loader_alone_batch_time",
    "source_callback_time",
    "phases",
}


def views_args(demo_data, out, *extra):
    return [
        *PROFILE,
        "views",
        "--recipe",
        "pipelines/demo.toml",
        "--train",
        str(demo_data / "train"),
        "--batch-size",
        str(B),
        "--views",
        "2,1",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--cache-batches",
        "2",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def views_profiles(demo_data, tmp_path_factory):
    """Views profiles of the same setting on 1 rank (tolerance 25 %) and on 2 ranks (mpirun), with their stdout."""
    return on_one_and_two_ranks(
        tmp_path_factory.mktemp("views"),
        timeout=300,
        command=lambda ranks, out: views_args(demo_data, out, *(["--tolerance", "0.25"] if ranks == 1 else [])),
    )


@pytest.mark.parametrize("ranks", [1, 2])
def test_views_profile_json_table_and_plot(views_profiles, ranks):
    out, stdout = views_profiles[ranks]
    p = json.loads((out / "profile_views.json").read_text())
    tolerance = {1: 0.25, 2: 0.10}[ranks]
    assert p["kind"] == "profile_views" and p["views"] == [1, 2] and p["tolerance"] == tolerance
    assert (p["ranks"], p["batch_size"], p["per_rank_batch"], p["arch"], p["device"], p["decoder"]) == (
        ranks,
        B,
        B // ranks,
        "resnet20",
        DEVICE,
        DECODER,
    )
    assert (p["steps"], p["warmup"], p["cached_batches"]) == (2, 1, 2) and "at M = 1" in p["free_views_rule"]
    rows = p["results"]
    assert [r["views"] for r in rows] == [1, 2] and all(set(r) == ROW_KEYS for r in rows)
    reference = rows[0]["step_time"]
    for r in rows:
        assert r["step_time"] > 0 and 0 <= r["data_stall"] <= 1 and 0 <= r["data_wait"] <= r["step_time"]
        assert r["samples_per_s"] == pytest.approx(B / r["step_time"])
        assert r["views_per_s"] == pytest.approx(r["views"] * r["samples_per_s"])
        assert r["step_time_ratio"] == pytest.approx(r["step_time"] / reference)
        assert r["within_tolerance"] == (r["step_time"] <= (1 + tolerance) * reference)
        assert r["data_stall_raw"] == pytest.approx((r["step_time"] - r["memory_step_time"]) / r["step_time"])
        assert set(r["phases"]) == {"data", "h2d", "forward_backward", "allreduce_step"}
        assert r["phases"]["data"] == r["data_wait"] and sum(r["phases"].values()) <= r["step_time"] * (
            1 + 1e-9
        )  # parts of the step
        assert re.search(
            rf"^\| {r['views']} \| {1e3 * r['step_time']:.1f} \| .* \| {'yes' if r['within_tolerance'] else 'no'} \|",
            stdout,
            re.M,
        )
    assert p["free_views"] == free_views({r["views"]: r["step_time"] for r in rows}, tolerance)
    percent = {1: "25%", 2: "10%"}[ranks]
    assert stdout.count("profile views:") == 1  # rank 0 alone reports
    assert f"| M | ms/step | ± std | x M=1 | within {percent} |" in stdout and "| source ms/batch |" in stdout
    assert re.search(rf"^free views: M = {p['free_views']} \(step time within {percent} of M = 1\)$", stdout, re.M)
    with Image.open(out / "profile_views.png") as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_views_profile_times_each_m_between_two_syncs(stand_ins, monkeypatch):
    """Each M: the loader alone, steps fed by it, steps from memory, each a window of STEPS steps between
    2 synchronisations after WARMUP steps that add none (stand-in world, training and clock)."""
    monkeypatch.setattr(views_module, "load_step_data", lambda recipe, world: None)
    monkeypatch.setattr("dali_ba.distributed.join.init_world", lambda engine, share_gpu=False: SoloWorld())
    monkeypatch.setattr("dali_ba.training.checks.check_world", lambda recipe, world, train_set: recipe.data.batch_size)
    recipe = load_recipe(REPO / "pipelines" / "demo.toml")
    p = views_module.profile_views(recipe, [1, 2], 0.5, steps=STEPS, warmup=WARMUP, cache=2)
    assert stand_ins == window_log() * 3 * 2
    assert p["views"] == [1, 2] and p["timing"] == TIMING_RULE
    for row in p["results"]:  # the second sync's wait is in each step time, the first's (the warm-up's) is not
        assert DRAIN / STEPS <= row["step_time"] < 2 * DRAIN / STEPS
        assert row["data_wait"] == row["phases"]["data"] and row["steps_per_s"] == pytest.approx(1 / row["step_time"])
        assert row["phases"]["forward_backward"] >= 0.002


@pytest.mark.parametrize(
    "step_times, tolerance, expected",
    [
        ({1: 1.0, 2: 1.5, 4: 2.0, 8: 4.0}, 0.1, 1),  # nothing beyond M = 1 within tolerance
        ({1: 1.0}, 0.1, 1),  # M = 1 alone
        ({1: 1.0, 2: 1.02, 4: 1.1, 8: 1.3}, 0.1, 4),  # exactly at the limit counts
        ({1: 1.0, 2: 1.3, 4: 1.05, 8: 2.0}, 0.1, 4),  # non-monotone: a slow M between does not stop the count
        ({1: 1.0, 2: 0.9, 4: 0.95, 16: 1.0}, 0.1, 16),  # faster than M = 1 is within too
        ({4: 1.3, 1: 1.0, 2: 1.2}, 0.25, 2),  # order of measurement does not matter
        ({1: 1.0, 2: 1.5, 4: 1.9}, 1.0, 4),  # tolerance 100 %
    ],
)
def test_free_views_picks_the_largest_m_within_tolerance(step_times, tolerance, expected):
    assert free_views(step_times, tolerance) == expected


def test_free_views_needs_the_reference():
    with pytest.raises(ValueError, match="M = 1"):
        free_views({2: 1.0, 4: 1.0}, 0.1)


BAD = {
    "tolerance zero": (["--tolerance", "0"], r"--tolerance: must be a fraction > 0 and < 10 \(0.1 is 10%\), got 0$"),
    "tolerance ten": (["--tolerance", "10"], r"--tolerance: must be a fraction > 0 and < 10 .*got 10$"),
    "tolerance negative": (["--tolerance=-0.1"], r"--tolerance: must be a fraction > 0 and < 10 .*got -0.1$"),
    "tolerance nan": (["--tolerance", "nan"], r"--tolerance: must be a fraction > 0 and < 10 .*got nan$"),
    "tolerance text": (["--tolerance", "ten"], r"--tolerance: invalid float value: 'ten'"),
    "views without 1": (["--views", "2,4"], r"--views: must include 1 .*got '2,4'"),
    "views zero": (["--views", "0,1"], r"--views: expected integers >= 1, got '0,1'"),
    "unknown model": (["--arch", "resnet9000"], "unknown model 'resnet9000'"),
    "missing data": (["--train", "{tmp}/nope"], "data directory not found: .*nope"),
    "chunks over B*M at M = 1": (
        ["--batch-size", "4", "--chunks", "6", "--views", "1,2"],
        r"--chunks 6 is more than the B\*M = 4",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line(tmp_path, case):
    args, message = BAD[case]
    done = run_cli(
        *PROFILE,
        "views",
        "--recipe",
        "pipelines/demo.toml",
        "--out",
        str(tmp_path),
        *[a.format(tmp=tmp_path) for a in args],
        timeout=60,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("dali-ba profile views: error:") or lines[0].startswith("dali-ba profile: error:"), (
        lines[0]
    )
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "profile_views.json").exists()


def test_help_exits_zero():
    done = run_cli(*PROFILE, "views", "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--tolerance" in done.stdout and "--cache-batches" in done.stdout and "1,2,4,8,16" in done.stdout
    assert "--view-size" in done.stdout  # the recipe's flags, all but its --views


def test_views_profile_hands_over_each_finished_m(stand_ins, monkeypatch):
    """After each M but the last, rank 0 is handed the sweep so far, marked incomplete, M = 1 (the
    reference) measured first whatever the order given."""
    monkeypatch.setattr(views_module, "load_step_data", lambda recipe, world: None)
    monkeypatch.setattr("dali_ba.distributed.join.init_world", lambda engine, share_gpu=False: SoloWorld())
    monkeypatch.setattr("dali_ba.training.checks.check_world", lambda recipe, world, train_set: recipe.data.batch_size)
    recipe = load_recipe(REPO / "pipelines" / "demo.toml")
    partials: list[dict] = []
    p = views_module.profile_views(recipe, [1, 2, 4], 0.5, STEPS, WARMUP, 2, progress=partials.append)
    assert [(q["complete"], q["measured"], [r["views"] for r in q["results"]]) for q in partials] == [
        (False, [1], [1]),
        (False, [1, 2], [1, 2]),
    ]
    assert p["complete"] is True and p["measured"] == [1, 2, 4] and len(p["results"]) == 3
    assert partials[1]["results"][:2] == p["results"][:2]


def test_a_views_profile_killed_after_its_first_m_leaves_it(demo_data, tmp_path):
    """A real sweep (the demo recipe) killed once M = 1 is saved, as the GPU check kills a step at its
    limit: a valid JSON holding M = 1, marked incomplete, and no plot (that comes with the whole sweep)."""
    import subprocess

    from test_profile import wait_for_partial

    out = tmp_path / "killed"
    args = views_args(demo_data, out)
    args[args.index("--views") + 1] = "1,8"
    args[args.index("--steps") + 1] = "40"  # M = 8's windows long enough for the kill to come first
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = wait_for_partial(process, out / "profile_views.json", lambda p: True)
    left = json.loads((out / "profile_views.json").read_text())
    for p in (seen, left):
        assert p["complete"] is False and p["measured"] == [1] and p["views"] == [1, 8]
        assert [r["views"] for r in p["results"]] == [1] and p["results"][0]["step_time"] > 0
    assert not (out / "profile_views.png").exists()
