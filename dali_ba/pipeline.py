"""Decode once, then M views: the DALI graphs behind the loaders.

Each training graph reads B encoded samples and decodes each one exactly once. The samples come
from DALI's file reader, or, for tar shards, from an external source that reads each sample's byte
range (:class:`ShardSource`): either way in the order the loader planned. On the CPU path the
graph stops there (:func:`decode_pipeline`) and torch makes the views (:mod:`dali_ba.views`); on
the GPU path (:func:`batch_augment_pipeline`, "mixed" decoder) DALI's GPU operators make them. Both
render the same parameters, drawn by :mod:`dali_ba.augment` and fed here through an external source.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Union

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

READER_NAME = "reader"


def imagenet_view(images, bounds, box, flip, hole, view_size: int):
    """The box (top, left, height, width) resized to ``view_size`` squared (bilinear, antialiased), mirrored on ``flip``.

    ``bounds`` is the decoded (height, width): the box is clipped to it, as DALI's CPU resize reads
    outside the image otherwise (a box drawn from a header that disagrees with the decoder)."""
    box = fn.cast(box, dtype=types.FLOAT)
    start, end = dmath.min(box[0:2], bounds - 1), dmath.min(box[0:2] + box[2:4], bounds)
    view = fn.resize(images, size=(view_size, view_size), roi_start=start, roi_end=end,
                     roi_relative=False, antialias=True, interp_type=types.INTERP_LINEAR)
    return fn.flip(view, horizontal=flip)


def cifar_view(images, bounds, box, flip, hole, view_size: int):
    """The ``view_size`` window at the box's corner (zero outside the image), mirrored, with its hole zeroed."""
    box, hole = fn.cast(box, dtype=types.INT32), fn.cast(hole, dtype=types.FLOAT)
    view = fn.slice(images, start=box[0:2], shape=box[2:4], axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
    view = fn.flip(view, horizontal=flip)
    return fn.erase(view, anchor=hole[0:2], shape=hole[2:4] - hole[0:2], axis_names="HW", fill_value=0)


VIEW_GRAPHS: dict[str, Callable] = {"imagenet": imagenet_view, "cifar": cifar_view}


class ShardSource:
    """External source of encoded samples from tar shards: batch ``i`` holds the bytes and labels of
    ``indices[i*B:(i+1)*B]`` (``labels`` are the indices' own, int32); the pass ends after the last.

    The reads of the next ``READ_AHEAD`` batches run in a thread pool while DALI decodes, as DALI's
    own file reader reads ahead: from a cold file system a batch's reads are not serial waits."""

    READ_AHEAD = 2

    def __init__(self, members, indices: np.ndarray, labels: np.ndarray, batch_size: int) -> None:
        self.members, self.indices, self.labels, self.batch_size = members, indices, labels, batch_size
        self._reads: dict[int, list[Future]] = {}

    def _read_ahead(self, batch: int) -> None:
        at = batch * self.batch_size
        if at < len(self.indices) and batch not in self._reads:
            pool = _read_pool()
            self._reads[batch] = [pool.submit(self.members.read, index) for index in self.indices[at : at + self.batch_size]]

    def __call__(self, info) -> tuple[list[np.ndarray], list[np.ndarray]]:
        at = info.iteration * self.batch_size
        if at >= len(self.indices):
            raise StopIteration
        for batch in range(info.iteration, info.iteration + self.READ_AHEAD + 1):
            self._read_ahead(batch)
        encoded = [np.frombuffer(read.result(), dtype=np.uint8) for read in self._reads.pop(info.iteration)]
        return encoded, [self.labels[i : i + 1] for i in range(at, at + self.batch_size)]


_READ_POOLS: dict[int, ThreadPoolExecutor] = {}
READ_THREADS = 4  # reads wait on the file system, not the CPU: a few more threads than cores is fine


def _read_pool() -> ThreadPoolExecutor:
    """This process's pool of shard-reading threads (a forked child makes its own)."""
    pool = _READ_POOLS.get(os.getpid())
    if pool is None:
        pool = _READ_POOLS[os.getpid()] = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="dali-ba-shards")
    return pool


Samples = Union[ShardSource, tuple[Sequence[str], Sequence[int]]]  # what a graph reads: shards, or (files, labels)


def read_samples(samples: Samples):
    """Encoded samples and their labels, in the planned order."""
    if isinstance(samples, ShardSource):
        return fn.external_source(samples, num_outputs=2, batch_info=True, dtype=[types.UINT8, types.INT32], ndim=[1, 1])
    files, labels = samples
    return fn.readers.file(files=list(files), labels=list(labels), random_shuffle=False, name=READER_NAME)


def _read_and_decode(samples: Samples, decoder: str):
    encoded, label = read_samples(samples)
    return fn.decoders.image(encoded, device=decoder, output_type=types.RGB), label


@pipeline_def
def decode_pipeline(samples: Samples, decoder: str = "cpu"):
    """The CPU path's graph: per sample, the decoded (H, W, 3) uint8 image (sizes vary) and its label."""
    return _read_and_decode(samples, decoder)


@pipeline_def
def batch_augment_pipeline(
    samples: Samples,
    params: Callable,
    views: int,
    view_size: int,
    augment: str = "imagenet",
    decoder: str = "mixed",
):
    """Per sample: (M, view_size, view_size, 3) uint8 views of one decode, and its label.

    ``params(batch_info)`` returns the batch's view parameters as three arrays, boxes (B, M, 4),
    flips (B, M) and holes (B, M, 4) (see :class:`dali_ba.augment.ViewParams`).
    """
    images, label = _read_and_decode(samples, decoder)
    used = 3 if augment == "cifar" else 2  # imagenet has no holes
    drawn = fn.external_source(lambda info: params(info)[:used], num_outputs=used, batch_info=True,
                               dtype=[types.INT64, types.BOOL, types.INT64][:used])
    boxes, flips, holes = drawn[0], fn.cast(drawn[1], dtype=types.INT32), drawn[2] if used == 3 else None
    bounds = images.shape(dtype=types.FLOAT)[0:2]
    make_view = VIEW_GRAPHS[augment]
    out = [make_view(images, bounds, boxes[m], flips[m], holes if holes is None else holes[m], view_size)
           for m in range(views)]
    return fn.stack(*out), label


@pipeline_def
def center_crop_pipeline(samples: Samples, resize: int, crop: int, decoder: str = "cpu"):
    """Validation: resize the shorter side to ``resize``, then a centred ``crop`` square; one view."""
    images, label = _read_and_decode(samples, decoder)
    images = fn.resize(images, resize_shorter=resize)
    return fn.crop(images, crop=(crop, crop)), label
