"""Checkpoints: everything a run needs to carry on exactly where it stopped.

A checkpoint holds the model, optimizer, AMP scaler and LR-schedule state, the step and epoch, the
torch RNG states, the running epoch sums and every rank's loader position (epoch and batches
done), so a resumed run reads the same remaining samples under the same augmentations and, on
CPU, reaches bit-identical parameters. Only rank 0 writes: to a temporary file, then an atomic
rename, keeping the newest ``keep`` (on a full disk the temporary file is removed and the run stops:
:mod:`dali_ba.training.output`). Files load with ``torch.load(weights_only=True)``: tensors and
plain Python values only, no code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dali_ba.activity import ACTIVITY
from dali_ba.errors import UsageError
from dali_ba.training.output import checkpoint_dir, list_checkpoints, writing
from dali_ba.version import __version__

FORMAT = 1


def save_checkpoint(output: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as ``checkpoints/step-<step>.pt`` atomically; delete all but the newest ``keep``."""
    import torch

    folder = checkpoint_dir(output)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:09d}.pt"
    temporary = path.with_name(f".{path.name}.tmp")
    with (
        writing(path, output, partial=temporary),
        ACTIVITY.writing_file(),
    ):  # a full disk, a stall: no temporary file left
        with open(temporary, "wb") as file:
            torch.save({"format": FORMAT, "version": __version__, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)  # readers see the old set or the new file, never half a file
    for old in list_checkpoints(output)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only); raises UsageError naming the file if it is not one."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"checkpoint {path} cannot be loaded ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"checkpoint {path} is not a dali-ba checkpoint (format {FORMAT})")
    if state.get("version") != __version__:  # loader positions and states change between versions
        raise UsageError(
            f"checkpoint {path} was written by dali-ba {state.get('version') or '0.1 or older'}, this is "
            f"dali-ba {__version__}: resume it with that version, or start afresh in a new --output"
        )
    return state


def find_resume_point(resume: str, output: Path, warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """What ``--resume`` names: nothing (''), the newest loadable checkpoint of ``output`` ('auto',
    skipping damaged ones with a warning; None if there is none), or one file."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise UsageError(f"--resume {resume}: no such checkpoint file")
        return path, load_checkpoint(path)
    for path in list_checkpoints(output):
        try:
            return path, load_checkpoint(path)
        except UsageError as exc:
            warn(f"warning: skipping damaged checkpoint: {exc}")
    return None


def check_compatible(state: dict[str, Any], path: Path, expected: dict[str, Any]) -> None:
    """A checkpoint resumes only the run that wrote it: same world size, model, data shape and seed,
    and the same data (where the checkpoint names it: older ones do not)."""
    if "data" in expected:  # first: a changed data set also changes what follows from it (steps_per_epoch)
        check_same_data(state["run"].get("data"), path, expected["data"])
    for key, value in expected.items():
        if key == "data":
            continue
        if state["run"].get(key) != value:
            raise UsageError(
                f"checkpoint {path} was written with {key} = {state['run'].get(key)!r}, "
                f"this run has {value!r}; resume with the same settings or use a new --output"
            )


def check_same_data(saved: dict[str, Any] | None, path: Path, expected: dict[str, Any]) -> None:
    """The data sets of a checkpoint (``saved``: per split its source, sample count and index
    fingerprint; None in a checkpoint written before they were kept) against this run's: a data set
    changed between a crash and the resume is an error, not a silently different epoch."""
    for split, now in expected.items():
        then = (saved or {}).get(split)
        if not then or then.get("sha256") == now["sha256"]:
            continue
        change = (
            f"it had {then['samples']} samples, now {now['samples']}"
            if then["samples"] != now["samples"]
            else f"the same {now['samples']} samples, but other paths or labels"
        )
        raise UsageError(
            f"{'training' if split == 'train' else 'validation'} data {now['source']} has changed since checkpoint "
            f"{path} was written ({change}); resume with the data it was written with, or start a new run in a "
            "new --output"
        )
