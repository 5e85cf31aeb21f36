"""How a loader drives DALI: which decoder runs (``cpu`` or ``mixed``, and the mixed decoder's share
for the hardware JPEG decoder), and the :class:`Feed`, a pipeline built once per run whose source is
handed each pass over data (:class:`~dali_ba.loading.reader.DataPass`) in turn.

The graphs themselves are :mod:`dali_ba.loading.pipeline`'s; the bytes they read,
:mod:`dali_ba.loading.reader`'s. Cheap to import (torch and DALI are imported when used):
:mod:`dali_ba.recipe` takes its ``hw_decoder_load`` default from here.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dali_ba.errors import UsageError

if TYPE_CHECKING:
    from dali_ba.loading.reader import DataPass, SampleSource

# A process forked from one that has run DALI pipelines (a torch DataLoader's workers, say) inherits
# their Python objects but not their threads. A loader is freed by the cyclic collector (its
# pipelines' source calls back into it), and if that collection comes in the child, DALI's
# Pipeline.__del__ shuts down an executor whose threads, and perhaps a lock one of them held at the
# fork, are not there: it waits forever (seen: a DataLoader worker hung in Pipeline._shutdown, a test
# left waiting on it). The child freezes what it inherited, so the collector never destroys it
# there; what the child makes itself is collected as usual.
os.register_at_fork(after_in_child=gc.freeze)

DECODERS = ("auto", "cpu", "mixed")
# The mixed decoder's share of each batch for the hardware JPEG decoder (the rest: CUDA), written
# out because DALI's own default changed between releases (0.90 with the nvImageCodec decoder, 0.65
# again from DALI PR #6366): without it the split would be whatever the installed DALI picks.
DEFAULT_HW_DECODER_LOAD = 0.65
PREFETCH_DEPTH = 2  # DALI's default prefetch_queue_depth: batches decoded ahead of the one yielded
# What "the same views whatever the number of ranks" allows on the mixed decoder: DALI's hybrid
# decoder splits a batch between the hardware JPEG decoder and CUDA (hw_decoder_load), which round
# differently, so a sample's pixels may depend on its place in a batch (and so on the number of
# ranks) by a grey level or so; its views' geometry (boxes, flips, ops) never does. On the cpu
# decoder the views are bit-identical.
MIXED_DECODE_TOLERANCE = 3  # grey levels, any pixel


def resolve_decoder(decoder: str) -> str:
    import torch  # here, not at the top: this module is imported for its constants without torch

    if decoder not in DECODERS:
        raise UsageError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    if decoder == "mixed" and not torch.cuda.is_available():
        raise UsageError("decoder 'mixed' needs a visible GPU; use 'cpu' or 'auto'")
    return decoder


def checked_hw_decoder_load(load: float) -> float:
    """The mixed decoder's share for the hardware JPEG decoder (ignored by the cpu decoder): 0 to 1."""
    if not 0 <= load <= 1:
        raise UsageError(f"hw_decoder_load must be between 0 and 1, got {load}")
    return float(load)


class Feed:
    """A DALI pipeline built once for the run and the source that feeds it: each pass hands the
    source a new :class:`~dali_ba.loading.reader.DataPass` (and resets the pipeline), so large graphs
    are not rebuilt every epoch. A pass left before its end (``itertools.islice``, a ``break``) is
    drained when the next starts."""

    def __init__(self, pipe: Any, source: SampleSource, iterate: bool) -> None:
        self.pipe, self.source, self._iterate = pipe, source, iterate
        self._iterator: Any = None  # the built pipeline, or DALI's torch iterator over it
        self._started = self._open = False

    def run(self, data_pass: DataPass) -> Iterator[Any]:
        """The pass's batches: (images, labels) torch tensors through DALI's torch iterator
        (``iterate``), else the pipeline's own (TensorList, TensorList) outputs."""
        if self._open:
            self.source.stop()
            for _ in self._outputs():
                pass
        self.source.start(data_pass)
        if self._started:
            self._iterator.reset() if self._iterate else self.pipe.reset()
        self._started = self._open = True
        yield from self._outputs()
        self._open = False

    def _outputs(self) -> Iterator[Any]:
        if not self._iterate:
            if self._iterator is None:
                self.pipe.build()
                self._iterator = self.pipe  # built: the marker that the first pass has begun
            while True:
                try:
                    outputs = self.pipe.run()
                except StopIteration:
                    return
                yield outputs
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self._iterator is None:  # builds the pipeline and prefetches from the pass just started
            self._iterator = DALIGenericIterator(
                self.pipe, ["images", "labels"], last_batch_policy=LastBatchPolicy.DROP, auto_reset=False
            )
        while True:  # next(), not a for loop: DALI's iterator resets itself in __iter__ after an end
            try:
                (batch,) = next(self._iterator)
            except StopIteration:
                return
            yield batch["images"], batch["labels"]
