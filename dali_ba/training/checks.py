"""Checks of a run's inputs, made before a pipeline or a model exists: the output folder, the data,
and what needs the world size (the per-rank batch, the memory a batch of views takes).

Each refuses with a :class:`~dali_ba.errors.UsageError` naming the flag to change.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from dali_ba.data.dataset import ImageDataset, load_dataset
from dali_ba.distributed.launcher import launcher_rank
from dali_ba.errors import UsageError

if TYPE_CHECKING:
    import torch

    from dali_ba.distributed.world import World
    from dali_ba.recipe import Recipe


def check_not_a_run(output: Path, resume: str) -> None:
    """Refuse an output folder that already holds a run (its metrics would be overwritten), unless
    the run is being resumed."""
    metrics = output / "metrics.jsonl"
    if not resume and metrics.exists() and metrics.stat().st_size:
        raise UsageError(
            f"--output {output} already holds a run (metrics.jsonl); pick a new folder, remove it, "
            "or continue it with --resume auto"
        )


def check_output(output: Path, resume: str) -> None:
    """:func:`check_not_a_run`, and refuse an output folder that cannot be created or written (rank 0
    tries both, then removes what it created: nothing is left behind if the run stops before it starts)."""
    check_not_a_run(output, resume)
    if launcher_rank() != 0:  # one prober: on a shared file system the others' folders would race it
        return
    missing = [p for p in (output, *output.parents) if not p.exists()]
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as exc:
        raise UsageError(f"--output {output}: cannot create or write it ({exc.strerror or exc})") from None
    finally:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


BATCH_COPIES = 7  # uint8 batches a rank holds at once (DALI's prefetch + the one in use) + its float copy (x4)
PARAMETER_BYTES = 16  # fp32 weights, gradients, SGD momentum and the all-reduce buffer: 4 copies of 4 bytes


def check_memory(
    per_rank: int,
    views: int,
    view_size: int,
    local_ranks: int,
    device: torch.device | None = None,
    parameters: int | None = None,
) -> None:
    """Refuse a run that cannot fit: B*M*S^2*3 bytes per uint8 batch of views, about BATCH_COPIES of
    them per rank, plus PARAMETER_BYTES per model parameter (counted from the model), against the
    memory available on this node, and, given a GPU ``device``, against the GPU memory free there
    (one rank's). Activations come on top: they depend on the network, and an out-of-memory step is
    its own one-line error."""
    batch = per_rank * views * view_size**2 * 3
    model = (parameters or 0) * PARAMETER_BYTES
    if device is None:
        need, available = (batch * BATCH_COPIES + model) * local_ranks, _available_memory()
        where = f"{local_ranks} rank(s) on this node"
        advice = "lower --view-size, --batch-size or --views, or use more nodes"
    else:
        import torch

        need, available, where = (
            batch * BATCH_COPIES + model,
            torch.cuda.mem_get_info(device)[0],
            f"one rank on GPU {device}",
        )
        advice = "lower --view-size, --batch-size or --views, or use more GPUs"
    if available is not None and need > available:
        weights = (
            (
                f" and the model's {parameters / 1e6:.1f} M parameters ({_bytes(model)} with gradients, momentum "  # type: ignore[operator]  # model > 0: parameters is set
                "and the all-reduce buffer)"
            )
            if model
            else ""
        )
        advice += ", or pick a smaller --arch" if model else ""
        raise UsageError(
            f"--view-size {view_size} with {per_rank} samples x M={views} views per rank: one batch of "
            f"views is {_bytes(batch)} (B*M*S^2*3), about {_bytes(need)} for {where} with prefetching, "
            f"the float copy{weights}, more than the {_bytes(available)} available; {advice}"
        )


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} PiB"


def check_datasets(recipe: Recipe) -> tuple[ImageDataset, ImageDataset]:
    """Index both splits; validation labels follow the training classes."""
    train_set = load_dataset(recipe.data.train)
    val_set = load_dataset(recipe.data.val, classes=train_set.classes)
    check_labels(train_set, val_set)
    return train_set, val_set


def check_labels(train_set: ImageDataset, val_set: ImageDataset) -> None:
    """Validation labels must be training classes."""
    if val_set.labels.max() >= train_set.num_classes:
        raise UsageError(
            f"validation data {val_set.source} has labels >= {train_set.num_classes}, the training classes"
        )


def check_world(recipe: Recipe, world: World, *datasets: ImageDataset) -> int:
    """Checks that need the world size; returns the per-rank batch."""
    d, o = recipe.data, recipe.optim
    if d.batch_size % world.size:
        raise UsageError(f"--batch-size {d.batch_size} (global) is not divisible by {world.size} ranks")
    per_rank = d.batch_size // world.size
    if per_rank * d.views < o.chunks:
        raise UsageError(f"--chunks {o.chunks} is more than the {per_rank * d.views} views per rank per step")
    for dataset in datasets:
        if len(dataset) < world.size:
            raise UsageError(f"data {dataset.source} has {len(dataset)} samples but there are {world.size} ranks")
    parameters = model_parameters(recipe, datasets[0]) if datasets else None
    check_memory(per_rank, d.views, d.view_size, world.local_size, parameters=parameters)
    return per_rank


def model_parameters(recipe: Recipe, train_set: ImageDataset) -> int | None:
    """The parameter count of the recipe's model for the training classes (see ``count_parameters``)."""
    from dali_ba.training.models import count_parameters

    return count_parameters(recipe.model.arch, train_set.num_classes, recipe.model.dropout)
