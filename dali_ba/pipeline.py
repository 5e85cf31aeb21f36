"""Decode once, then M views: the DALI graphs behind the loaders.

Each training graph reads B encoded samples and decodes each one exactly once. The samples come
from DALI's file reader, or, for tar shards, from an external source that reads each sample's byte
range (:class:`ShardSource`): either way in the order the loader planned. On the CPU path the
graph stops there (:func:`decode_pipeline`) and torch makes the views (:mod:`dali_ba.views`); on
the GPU path (:func:`batch_augment_pipeline`, "mixed" decoder) DALI's GPU operators make them. Both
render the same parameters, drawn by :mod:`dali_ba.augment` and fed here through an external source;
for ``trivial`` and ``randaugment`` those include each view's ops, magnitude bins and signs, which
DALI's own ``auto_aug`` augmentations apply (:func:`auto_augment_view`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Union

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

from dali_ba.augment import AUTO_OPS, MAGNITUDE_BINS

READER_NAME = "reader"
FILL = 128  # what DALI's warps bring in from outside a view (its auto_aug default)
# The external source's arrays: boxes, flips, holes, then the auto-augment ops, magnitude bins, signs.
PARAM_TYPES = (types.INT64, types.BOOL, types.INT64, types.INT32, types.INT32, types.INT32)


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


def dali_suite(augment: str) -> list:
    """DALI's op suite for an auto-augmentation, the one :data:`dali_ba.augment.AUTO_OPS` copies."""
    from nvidia.dali.auto_aug import rand_augment, trivial_augment

    return {"trivial": trivial_augment.get_trivial_augment_wide_suite, "randaugment": rand_augment.get_rand_augment_suite}[augment]()


def auto_augment_view(view, suite: list, ops, bins, signs, count: int):
    """The view after its ``count`` drawn ops (``ops``, ``bins``, ``signs``: (count,) per sample),
    applied in order with DALI's own augmentations at the drawn magnitude bins and signs (from the
    external source, not DALI's RNG). Needs a pipeline with ``enable_conditionals``: ``select``
    splits the batch by op."""
    from nvidia.dali.auto_aug.core import signed_bin
    from nvidia.dali.auto_aug.core._select import select

    for k in range(count):
        magnitude = signed_bin(bins[k], random_sign=signs[k])
        view = select(suite, ops[k], data=view, magnitude_bin=magnitude, num_magnitude_bins=MAGNITUDE_BINS,
                      fill_value=FILL, interp_type=None)
    return view


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


def _batch_augment_graph(
    samples: Samples,
    params: Callable,
    views: int,
    view_size: int,
    augment: str = "imagenet",
    decoder: str = "mixed",
    auto_ops: int = 0,
):
    images, label = _read_and_decode(samples, decoder)
    outputs = [0, 1] + [2] * (augment == "cifar") + [3, 4, 5] * bool(auto_ops)  # of PARAM_TYPES: only those used

    def source(info) -> list:
        params_of_batch = params(info)
        return [params_of_batch[i] for i in outputs]

    drawn = dict(zip(outputs, fn.external_source(source, num_outputs=len(outputs), batch_info=True,
                                                 dtype=[PARAM_TYPES[i] for i in outputs])))
    boxes, flips, holes = drawn[0], fn.cast(drawn[1], dtype=types.INT32), drawn.get(2)
    bounds = images.shape(dtype=types.FLOAT)[0:2]
    make_view = VIEW_GRAPHS["cifar" if augment == "cifar" else "imagenet"]
    out = [make_view(images, bounds, boxes[m], flips[m], holes if holes is None else holes[m], view_size)
           for m in range(views)]
    if auto_ops:
        suite = dali_suite(augment)
        ops, bins, signs = drawn[3], drawn[4], drawn[5]
        out = [auto_augment_view(view, suite, ops[m], bins[m], signs[m], auto_ops) for m, view in enumerate(out)]
    return fn.stack(*out), label


_views_pipeline = pipeline_def(_batch_augment_graph)
_auto_views_pipeline = pipeline_def(_batch_augment_graph, enable_conditionals=True)


def batch_augment_pipeline(*, augment: str = "imagenet", auto_ops: int = 0, **kwargs):
    """Per sample: (M, view_size, view_size, 3) uint8 views of one decode, and its label.

    ``params(batch_info)`` returns the batch's view parameters as arrays: boxes (B, M, 4), flips
    (B, M), holes (B, M, 4), then for ``auto_ops`` n > 0 ops (B, M, n), magnitude bins (B, M, n)
    and signs (B, M, n) as int32 (see :class:`dali_ba.augment.ViewParams`). Conditionals (for the
    auto-augment op selection) are enabled only when there are ops to select.
    """
    if augment in AUTO_OPS and not auto_ops:
        raise ValueError(f"augment {augment!r} needs auto_ops >= 1")
    make = _auto_views_pipeline if auto_ops else _views_pipeline
    return make(augment=augment, auto_ops=auto_ops, **kwargs)


@pipeline_def
def center_crop_pipeline(samples: Samples, resize: int, crop: int, decoder: str = "cpu"):
    """Validation: resize the shorter side to ``resize``, then a centred ``crop`` square; one view."""
    images, label = _read_and_decode(samples, decoder)
    images = fn.resize(images, resize_shorter=resize)
    return fn.crop(images, crop=(crop, crop)), label
