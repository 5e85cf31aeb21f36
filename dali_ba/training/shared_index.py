"""One listing of the data per job: rank 0 indexes the training and validation data, every other rank
receives the index over the engine's own channel (:meth:`~dali_ba.distributed.world.World.broadcast_object`).

On a parallel file system the listing is the metadata load: 1.28 M ImageNet files listed by each of
512 ranks is 512 passes over the metadata servers at start-up. Listed once, the index (about 28 bytes
a sample: :class:`~dali_ba.data.path_table.PathTable`) is a tree broadcast of some 40 MB, and the
ranks that did not list touch nothing of the data set until training reads its files.

A data problem found by rank 0 is sent instead of the index: every rank raises the same
:class:`~dali_ba.errors.UsageError` (rank 0 says it, all exit 2), none waits for an index that never
comes. Rank 0 raises only once every rank holds the error (a barrier): under Horovod over MPI, rank 0's
exit shuts Horovod down on every rank and finalizes MPI under a rank that had not yet received it, which
then aborted in its broadcast instead of exiting 2.

What this process did is kept in :data:`INDEX` (the start record and environment.json name it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from dali_ba.errors import UsageError
from dali_ba.training.checks import check_datasets

if TYPE_CHECKING:
    from dali_ba.data.dataset import ImageDataset
    from dali_ba.distributed.world import World
    from dali_ba.recipe import Recipe

LISTED_BY = 0  # the rank that lists
T = TypeVar("T")


@dataclass(frozen=True)
class IndexOrigin:
    """How this process got its index: ``listed`` it (rank ``listed_by``) or received it; the listing's
    ``seconds`` (on the rank that listed), the training ``samples``, its index's ``bytes_per_sample`` and
    ``sha256`` (its fingerprint, computed by this process from the index it holds)."""

    listed_by: int
    listed: bool
    seconds: float
    samples: int
    val_samples: int
    bytes_per_sample: float
    sha256: str

    def record(self) -> dict[str, Any]:
        """The start record's ``index`` (rank 0's view)."""
        return {k: v for k, v in asdict(self).items() if k != "listed"}


INDEX: IndexOrigin | None = None  # set by shared_datasets(): how this process got its index


def listed_once(world: World, build: Callable[[], T]) -> T:
    """Collective: ``build()`` run by rank 0 alone, its result sent to the other ranks. A problem in it
    is the same UsageError on every rank (an unexpected exception too, named), and rank 0 raises only
    once every rank holds it."""
    if world.rank != LISTED_BY:
        kind, payload = world.broadcast_object(None)
        if kind == "error":
            world.barrier()  # rank 0 leaves once every rank holds the error
            raise UsageError(payload)
        return cast(T, payload)
    try:
        built = build()
    except UsageError as exc:
        _send_error(world, str(exc))
        raise
    except Exception as exc:  # no rank waits for an index that never comes
        _send_error(world, f"rank {LISTED_BY} could not index the data ({type(exc).__name__}: {exc})")
        raise
    world.broadcast_object(("index", built))
    return built


def shared_datasets(recipe: Recipe, world: World) -> tuple[ImageDataset, ImageDataset]:
    """Collective: the training and validation data sets, indexed by rank 0 alone and sent to the
    others (one process: indexed here). A data problem is the same UsageError on every rank."""
    global INDEX

    def timed() -> tuple[ImageDataset, ImageDataset, float]:
        start = time.perf_counter()
        train_set, val_set = check_datasets(recipe)
        return train_set, val_set, time.perf_counter() - start

    train_set, val_set, seconds = listed_once(world, timed)
    INDEX = IndexOrigin(
        listed_by=LISTED_BY,
        listed=world.rank == LISTED_BY,
        seconds=round(seconds, 3),
        samples=len(train_set),
        val_samples=len(val_set),
        bytes_per_sample=round(train_set.index_bytes / len(train_set), 1),
        sha256=train_set.fingerprint(),
    )
    return train_set, val_set


def _send_error(world: World, message: str) -> None:
    """Rank 0: send the data problem instead of the index, and return once every rank holds it."""
    world.broadcast_object(("error", message))
    world.barrier()


def index_record() -> dict[str, Any] | None:
    """The start record's ``index``: who listed, in how long, how many samples, how many bytes each."""
    return INDEX.record() if INDEX is not None else None


def index_role() -> dict[str, str] | None:
    """This process's part in the listing, for its environment.json entry: ``role`` "listed" or
    "received", and the ``sha256`` of the training index it holds (equal on every rank)."""
    if INDEX is None:
        return None
    return {"role": "listed" if INDEX.listed else "received", "sha256": INDEX.sha256}
