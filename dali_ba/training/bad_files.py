"""Broken files: one record of them for every loader of a run, and its sharing among the ranks.

The loaders skip the files they cannot decode (training refills the batch, evaluation leaves the file
out) and each rank names what it finds; all the run's loaders share one record, so a file found by one
is not read again by another. The trainer merges the ranks' records at each checkpoint and epoch end
(:func:`share_bad_files`: rank 0 lists them in ``bad_files.txt``), and a checkpoint carries the list
(:mod:`dali_ba.training.checkpoint_state`), so a resumed run skips the same files.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dali_ba.recipe import Recipe
from dali_ba.training.console import emit
from dali_ba.training.output import writing

if TYPE_CHECKING:
    from dali_ba.distributed.world import World
    from dali_ba.loading.loader import BatchAugmentLoader
    from dali_ba.training.evaluation import Validation


def one_record_of_bad_files(
    recipe: Recipe, world: World, loader: BatchAugmentLoader, validation: Validation
) -> dict[str, str]:
    """One record of broken files for every loader of the run: found by any, refilled (training) or
    left out (evaluation) by all; each rank names what it finds, rank 0 lists them all."""
    d, rank = recipe.data, world.rank
    bad_files = loader.bad_files
    if validation.calibration:  # image sizes are read once per run, whichever loader meets a file first
        validation.calibration.sizes = loader.sizes
    for each in [loader, *validation.loaders]:
        each.bad_files, each.on_bad_file = (
            bad_files,
            lambda path, reason: emit(f"dali-ba: rank {rank}: skipping broken file {path} ({reason})", sys.stderr),
        )
        each.max_bad_files = d.max_bad_files if d.max_bad_files >= 0 else loader.max_bad_files
        each.max_image_pixels = d.max_image_pixels
    return bad_files


def share_bad_files(world: World, bad_files: dict[str, str], output: Path) -> list[list[str]]:
    """Collective: every rank's broken files, merged on all ranks and listed in bad_files.txt."""
    for part in world.gather(dict(bad_files)):
        bad_files.update(part)
    listed = sorted([path, reason] for path, reason in bad_files.items())
    if world.is_root and listed:
        with writing(output / "bad_files.txt", output):
            (output / "bad_files.txt").write_text("".join(f"{path}\t{reason}\n" for path, reason in listed))
    return listed
