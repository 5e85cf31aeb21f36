"""The trainer's small rules (the stop agreement, what a checkpoint must match) and the training
modules' layout: each import goes one way."""

import ast
import dataclasses

from conftest import REPO

from dali_ba.distributed.world import World
from dali_ba.recipe import load_recipe
from dali_ba.training.checkpoint_state import Start, run_identity
from dali_ba.training.trainer import STOP_EVERY, agree_on_stop


def test_ranks_agree_on_a_stop_after_an_epochs_first_step_its_last_and_every_few_steps():
    # A run resumed after step 3 whose epoch ends at step 23: its first step, every STOP_EVERY, its last.
    agreed = [step for step in range(4, 24) if agree_on_stop(step, epoch_steps=step - 3, last_of_epoch=step == 23)]
    assert agreed == [4, *range(STOP_EVERY, 23, STOP_EVERY), 23]
    assert [step for step in range(1, 9) if agree_on_stop(step, step, step == 8)] == [1, STOP_EVERY, 8]


def test_a_run_starts_at_the_first_epoch_with_empty_sums():
    assert Start() == Start(0, None, [0.0, 0.0, 0.0]) and Start().sums is not Start().sums


def test_a_checkpoint_must_match_the_randaugment_settings_only_under_randaugment():
    recipe = load_recipe("demo")
    identity = run_identity(recipe, World(), steps_per_epoch=7)
    assert identity["steps_per_epoch"] == 7 and identity["ranks"] == 1 and "randaugment_n" not in identity
    data = dataclasses.replace(recipe.data, augment="randaugment", randaugment_n=2, randaugment_m=9)
    identity = run_identity(dataclasses.replace(recipe, data=data), World(), steps_per_epoch=7)
    assert (identity["randaugment_n"], identity["randaugment_m"]) == (2, 9)


def imports(module: str) -> set[str]:
    """The dali_ba modules ``module`` imports anywhere (at the top, in functions, for type checking)."""
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dali_ba"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("dali_ba")}
    return found


def test_the_data_readers_import_one_way():
    """samples <- shard_reader <- dataset <- shard_writer (writing and its command line): no circle."""
    order = ["dali_ba.data.samples", "dali_ba.data.shard_reader", "dali_ba.data.dataset", "dali_ba.data.shard_writer"]
    for i, module in enumerate(order):
        assert not imports(module) & set(order[i:]) - {module}, module


def test_the_training_modules_import_one_way():
    """checks <- step <- evaluation <- trainer <- train."""
    order = [
        "dali_ba.training.checks",
        "dali_ba.training.step",
        "dali_ba.training.evaluation",
        "dali_ba.training.trainer",
        "dali_ba.train",
    ]
    for i, module in enumerate(order):
        assert not imports(module) & set(order[i:]) - {module}, module


def test_a_peer_gone_under_gloo_is_told_apart_from_this_ranks_own_error():
    """DDP's comm hook re-raises Gloo's transport error as a plain RuntimeError: it still means that
    another rank has gone (one line, exit 1), not a bug of this rank (a traceback)."""
    from dali_ba.train import _peer_gone

    hook = (
        "Got the following error when running the callback: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/"
        "gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:3281: Connection reset by peer. This is typically "
        "caused by a remote worker hanging or bugs in the application."
    )
    assert _peer_gone(RuntimeError(hook))
    assert _peer_gone(
        RuntimeError(
            "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
            "... Connection closed by peer [127.0.0.1]:4242"
        )
    )
    assert not _peer_gone(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x10 and 12x3)"))
    assert not _peer_gone(ValueError("Connection reset by peer"))  # not from Gloo's transport
