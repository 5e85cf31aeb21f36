"""Decode once, then M views: the DALI graphs behind the loaders.

Each training graph reads B encoded samples and decodes each one exactly once. The samples come
from the reader stage (:class:`dali_ba.loading.reader.SampleSource`, an external source), in the order
of the loader's pass, with the view parameters of their batch (drawn by :mod:`dali_ba.loading.augment`):
a graph is built once per run and each pass is a new :class:`~dali_ba.loading.reader.DataPass` for its
source. On the CPU path the graph stops after decoding (:func:`decode_pipeline`) and torch makes the
views (:mod:`dali_ba.loading.views`); on the GPU path (:func:`batch_augment_pipeline`, "mixed" decoder)
DALI's GPU operators make them. Both render the same parameters; for ``trivial`` and ``randaugment``
those include each view's ops, magnitude bins and signs, which DALI's own ``auto_aug`` augmentations
apply (:func:`auto_augment_view`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

from dali_ba.loading.augment import AUTO_OPS, MAGNITUDE_BINS
from dali_ba.loading.feed import DEFAULT_HW_DECODER_LOAD

if TYPE_CHECKING:
    from dali_ba.loading.reader import SampleSource

FILL = 128  # what DALI's warps bring in from outside a view (its auto_aug default)
# Every graph runs on DALI's dynamic executor, asked for outright (the default only where the
# executor is asynchronous and pipelined): ``images.shape()`` of the mixed decoder's GPU output is a
# GPU-to-CPU transfer, which only it does (DALI >= 1.44, dali_ba.install_choice.MIN_DALI).
EXECUTOR = dict(exec_dynamic=True)
# The external source's arrays: boxes, flips, holes, then the auto-augment ops, magnitude bins, signs.
PARAM_TYPES = (types.INT64, types.BOOL, types.INT64, types.INT32, types.INT32, types.INT32)


def imagenet_view(images, bounds, box, flip, hole, view_size: int):
    """The box (top, left, height, width) resized to ``view_size`` squared (bilinear, antialiased), mirrored
    on ``flip``.

    ``bounds`` is the decoded (height, width): the box is clipped to it, as DALI's CPU resize reads
    outside the image otherwise (a box drawn from a header that disagrees with the decoder)."""
    box = fn.cast(box, dtype=types.FLOAT)
    start, end = dmath.min(box[0:2], bounds - 1), dmath.min(box[0:2] + box[2:4], bounds)
    view = fn.resize(
        images,
        size=(view_size, view_size),
        roi_start=start,
        roi_end=end,
        roi_relative=False,
        antialias=True,
        interp_type=types.INTERP_LINEAR,
    )
    return fn.flip(view, horizontal=flip)


def cifar_view(images, bounds, box, flip, hole, view_size: int):
    """The ``view_size`` window at the box's corner (zero outside the image), mirrored, with its hole zeroed."""
    box, hole = fn.cast(box, dtype=types.INT32), fn.cast(hole, dtype=types.FLOAT)
    view = fn.slice(images, start=box[0:2], shape=box[2:4], axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
    view = fn.flip(view, horizontal=flip)
    return fn.erase(view, anchor=hole[0:2], shape=hole[2:4] - hole[0:2], axis_names="HW", fill_value=0)


def dali_suite(augment: str) -> list:
    """DALI's op suite for an auto-augmentation, the one :data:`dali_ba.loading.augment.AUTO_OPS` copies."""
    from nvidia.dali.auto_aug import rand_augment, trivial_augment

    return {
        "trivial": trivial_augment.get_trivial_augment_wide_suite,
        "randaugment": rand_augment.get_rand_augment_suite,
    }[augment]()


def auto_augment_view(view, suite: list, ops, bins, signs, count: int):
    """The view after its ``count`` drawn ops (``ops``, ``bins``, ``signs``: (count,) per sample),
    applied in order with DALI's own augmentations at the drawn magnitude bins and signs (from the
    external source, not DALI's RNG). Needs a pipeline with ``enable_conditionals``: ``select``
    splits the batch by op."""
    from nvidia.dali.auto_aug.core import signed_bin
    from nvidia.dali.auto_aug.core._select import select

    for k in range(count):
        magnitude = signed_bin(bins[k], random_sign=signs[k])
        view = select(
            suite,
            ops[k],
            data=view,
            magnitude_bin=magnitude,
            num_magnitude_bins=MAGNITUDE_BINS,
            fill_value=FILL,
            interp_type=None,
        )
    return view


VIEW_GRAPHS: dict[str, Callable] = {"imagenet": imagenet_view, "cifar": cifar_view}


def param_outputs(augment: str, auto_ops: int) -> list[int]:
    """Which of :data:`PARAM_TYPES` a view graph takes: boxes and flips, holes for cifar, the
    auto-augment ops, bins and signs when there are ops to apply."""
    return [0, 1] + [2] * (augment == "cifar") + [3, 4, 5] * bool(auto_ops)


def read_samples(samples: SampleSource, params: Sequence[int] = ()):
    """The pass's samples' encoded bytes and labels (and the ``params`` of :data:`PARAM_TYPES`
    the source also serves), from the reader stage (:mod:`dali_ba.loading.reader`)."""
    dtypes = [types.UINT8, types.INT32] + [PARAM_TYPES[i] for i in params]
    return fn.external_source(samples, num_outputs=len(dtypes), batch_info=True, dtype=dtypes)


def _read_and_decode(
    samples: SampleSource, decoder: str, params: Sequence[int] = (), hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD
):
    """The samples decoded to RGB; on the mixed decoder with ``hw_decoder_load`` of each batch for the
    hardware JPEG decoder (the rest on CUDA), never DALI's default, which changed between releases."""
    encoded, label, *drawn = read_samples(samples, params)
    # the cpu decoder has no such split
    split: dict[str, Any] = {"hw_decoder_load": hw_decoder_load} if decoder == "mixed" else {}
    return fn.decoders.image(encoded, device=decoder, output_type=types.RGB, **split), label, drawn


@pipeline_def(**EXECUTOR)
def decode_pipeline(samples: SampleSource, decoder: str = "cpu", hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD):
    """The CPU path's graph: per sample, the decoded (H, W, 3) uint8 image (sizes vary) and its label."""
    images, label, _ = _read_and_decode(samples, decoder, hw_decoder_load=hw_decoder_load)
    return images, label


def _batch_augment_graph(
    samples: SampleSource,
    views: int,
    view_size: int,
    augment: str = "imagenet",
    decoder: str = "mixed",
    auto_ops: int = 0,
    hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD,
):
    outputs = param_outputs(augment, auto_ops)
    images, label, params = _read_and_decode(samples, decoder, outputs, hw_decoder_load)
    drawn = dict(zip(outputs, params))
    boxes, flips, holes = drawn[0], fn.cast(drawn[1], dtype=types.INT32), drawn.get(2)
    bounds = images.shape(dtype=types.FLOAT)[0:2]
    make_view = VIEW_GRAPHS["cifar" if augment == "cifar" else "imagenet"]
    out = [
        make_view(images, bounds, boxes[m], flips[m], holes if holes is None else holes[m], view_size)
        for m in range(views)
    ]
    if auto_ops:
        suite = dali_suite(augment)
        ops, bins, signs = drawn[3], drawn[4], drawn[5]
        out = [auto_augment_view(view, suite, ops[m], bins[m], signs[m], auto_ops) for m, view in enumerate(out)]
    return fn.stack(*out), label


_views_pipeline = pipeline_def(_batch_augment_graph, **EXECUTOR)
_auto_views_pipeline = pipeline_def(_batch_augment_graph, enable_conditionals=True, **EXECUTOR)


def batch_augment_pipeline(*, augment: str = "imagenet", auto_ops: int = 0, **kwargs):
    """Per sample: (M, view_size, view_size, 3) uint8 views of one decode, and its label.

    ``samples`` serves, after the bytes and labels, the batch's view parameters of
    :func:`param_outputs`: boxes (B, M, 4), flips (B, M), holes (B, M, 4), then for ``auto_ops``
    n > 0 ops (B, M, n), magnitude bins (B, M, n) and signs (B, M, n) as int32 (see
    :class:`dali_ba.loading.augment.ViewParams`). Conditionals (for the auto-augment op selection) are
    enabled only when there are ops to select.
    """
    if augment in AUTO_OPS and not auto_ops:
        raise ValueError(f"augment {augment!r} needs auto_ops >= 1")
    make = _auto_views_pipeline if auto_ops else _views_pipeline
    return make(augment=augment, auto_ops=auto_ops, **kwargs)


@pipeline_def(**EXECUTOR)
def center_crop_pipeline(
    samples: SampleSource,
    resize: int,
    crop: int,
    decoder: str = "cpu",
    hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD,
):
    """Validation: resize the shorter side to ``resize``, then a centred ``crop`` square; one view."""
    images, label, _ = _read_and_decode(samples, decoder, hw_decoder_load=hw_decoder_load)
    images = fn.resize(images, resize_shorter=resize)
    return fn.crop(images, crop=(crop, crop)), label
