"""Broken files met during a pass: how a loader remembers them, refills their slots and recovers
when DALI fails on one. The reader (:mod:`dali_ba.loading.reader`) finds most of them before any
decoder sees them; this is what the loaders (:mod:`dali_ba.loading.loader`) do with them.

:class:`BadFileRecovery` is the part of a loader that keeps ``bad_files``: a known broken sample's
slot is refilled with the first good sample of its batch before a pass is read; when DALI fails on a
batch, Pillow (:mod:`dali_ba.loading.probe`) finds the broken files among the batches in flight and
the pass is rebuilt from the batch that failed. More than ``max_bad_files`` is a one-line error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dali_ba.errors import UnreadableImageError
from dali_ba.loading.feed import PREFETCH_DEPTH

if TYPE_CHECKING:
    from dali_ba.data.dataset import ImageDataset
    from dali_ba.loading.feed import Feed


def _undecodable(dataset: ImageDataset, indices: Sequence[int]) -> dict[str, str]:
    """{name: reason} for the samples Pillow cannot fully decode (asked only after DALI has failed)."""
    from dali_ba.loading.probe import decode_problem

    found = {}
    for index in dict.fromkeys(indices):  # once each, in order
        reason = decode_problem(dataset.open(index))
        if reason:
            found[dataset.files[index]] = reason
    return found


class BadFileRecovery:
    """A loader's broken files: the methods of :class:`dali_ba.loading.loader._ShardedLoader` that keep
    ``bad_files``, on the attributes it sets: ``dataset``, ``batch_size``, ``rank``, ``bad_files``
    ({path: reason}, perhaps shared by the loaders of a run), ``max_bad_files``, ``on_bad_file`` and
    the pipelines ``_feeds``. Paths are the data set's (``dataset.files``, its compact table: no copy)."""

    dataset: ImageDataset
    batch_size: int
    rank: int
    bad_files: dict[str, str]
    max_bad_files: int
    on_bad_file: Callable[[str, str], None] | None
    _feeds: dict[str, Feed]

    def _broken(self, indices: np.ndarray) -> np.ndarray:
        """Which of the samples ``indices`` are known broken files."""
        if not self.bad_files:
            return np.zeros(len(indices), dtype=bool)
        files = self.dataset.files
        return np.fromiter((files[i] in self.bad_files for i in indices.tolist()), dtype=bool, count=len(indices))

    def _refilled(self, order: np.ndarray) -> np.ndarray:
        """``order`` (whole batches) with each known-broken sample replaced by the first good sample of
        its batch (of the whole order if its batch has none): what the pipeline reads."""
        broken = self._broken(order)
        if not broken.any():
            return order
        if broken.all():
            raise UnreadableImageError(
                f"every file of rank {self.rank}'s share is broken ({len(self.bad_files)} "
                f"found, e.g. {next(iter(self.bad_files))}); check the data with "
                "dali-ba check-data"
            )
        refilled, fallback = order.copy(), order[~broken][0]
        for at in range(0, len(order), self.batch_size):
            batch, bad = refilled[at : at + self.batch_size], broken[at : at + self.batch_size]
            good = batch[~bad]
            batch[bad] = good[0] if len(good) else fallback
        return refilled

    def _recovering(self, make: Callable[[int], Iterator[Any]], order: np.ndarray, start: int) -> Iterator[Any]:
        """The batches of ``make(start)`` (a pass over ``order`` from batch ``start``). When DALI fails,
        the broken files among the batches in flight are found (DALI names the operator, not the
        file), remembered and reported, and the pass is rebuilt from the batch that failed: the same
        batches as a pass that knew of those files from the start."""
        position = start
        while True:
            try:
                for batch in make(position):
                    yield batch
                    position += 1
                return
            except RuntimeError:
                self._feeds.clear()  # a pipeline that failed is not reused
                suspects = order[position * self.batch_size : (position + PREFETCH_DEPTH + 2) * self.batch_size]
                found = _undecodable(
                    self.dataset, [i for i in suspects.tolist() if self.dataset.files[i] not in self.bad_files]
                )
                if not found:
                    raise
                self._remember(found)

    def _remember(self, found: dict[str, str]) -> None:
        for path, reason in found.items():
            self.bad_files[path] = reason
            if self.on_bad_file:
                self.on_bad_file(path, reason)
        if len(self.bad_files) > self.max_bad_files:
            path, reason = next(iter(found.items()))
            raise UnreadableImageError(
                f"{len(self.bad_files)} broken files found, more than --max-bad-files {self.max_bad_files} "
                f"(e.g. {path}: {reason}); check the data with dali-ba check-data {self.dataset.source}"
            )
