"""Decode once, then M views: the DALI graphs behind the loaders.

Each training graph reads B encoded samples and decodes each one exactly once, and of each only the
region its views read (:func:`decode_regions`). The samples come from the reader stage
(:class:`dali_ba.loading.reader.SampleSource`, an external source), in the order of the loader's
pass, with the regions and view parameters of their batch (drawn by :mod:`dali_ba.loading.augment`):
a graph is built once per run and each pass is a new :class:`~dali_ba.loading.reader.DataPass` for its
source. On the CPU path the graph stops after decoding (:func:`decode_pipeline`) and torch makes the
views (:mod:`dali_ba.loading.views`); on the GPU path (:func:`batch_augment_pipeline`, "mixed" decoder)
DALI's GPU operators make them. Both render the same parameters; for ``trivial`` and ``randaugment``
those include each view's ops, magnitude bins and signs, which DALI's own ``auto_aug`` augmentations
apply (:func:`auto_augment_view`), on a graph of a view per DALI sample (:func:`_view_slots_graph`):
one ``select`` per op over all B·M views, whatever M.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from nvidia.dali import fn, math, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from dali_ba.loading.augment import AUTO_OPS, MAGNITUDE_BINS
from dali_ba.loading.feed import DEFAULT_HW_DECODER_LOAD

if TYPE_CHECKING:
    from dali_ba.loading.reader import SampleSource

FILL = 128  # what DALI's warps bring in from outside a view (its auto_aug default)
# Every graph runs on DALI's dynamic executor, asked for outright (the default only where the
# executor is asynchronous and pipelined). No graph has a GPU-to-CPU edge, a CPU operator on a GPU
# output, which that executor makes wait on the host for the GPU every batch: the view graph takes
# its regions from the reader's headers (:func:`decode_regions`), not from ``images.shape()``.
EXECUTOR = dict(exec_dynamic=True)
# The external source's arrays after the bytes and labels, by name: the region of each image to
# decode (drawn from the size the reader read in its header), the boxes (in the region's pixels),
# flips, holes, then the auto-augment ops, magnitude bins and signs.
PARAM_TYPES = {
    "regions": types.INT32,  # as fn.slice takes a shape
    "boxes": types.INT64,
    "flips": types.BOOL,
    "holes": types.INT64,
    "ops": types.INT32,
    "bins": types.INT32,
    "signs": types.INT32,
}


def decode_regions(encoded, regions, decoder: str, **split):
    """Each image's region (top, left, height, width), and only it, decoded: DALI's ROI decode
    (libjpeg-turbo skips the rows and columns around it; the mixed decoder's hardware path decodes
    the region alone), the rest of the image never decoded. The region is its views' boxes' union
    (:func:`dali_ba.loading.augment.view_regions`), so the views are those of the whole image: on
    the cpu decoder bit for bit.

    Returns the part of each region inside the decoded image, and where the region's corner lies in
    it (``shifts``, (2,) int32 per sample: zero unless the region begins past the decoded image). A
    region reaching past the decoded image (a header that disagrees with its decoder: header_size
    applies the EXIF turn DALI's decoder applies, a broken header may still disagree) is cut to the
    image before decoding, as DALI's ROI decoders fail on it; a region wholly past it decodes one
    pixel of the image's corner. The decoded size comes from ``peek_image_shape`` (a CPU operator on
    the encoded bytes), never from the decoder's output: on the mixed decoder that is a CPU operator
    on a GPU output, which the dynamic executor makes wait on the host for the GPU every batch."""
    start, shape = regions[0:2], regions[2:4]
    decoded = fn.cast(fn.peek_image_shape(encoded)[0:2], dtype=types.INT32)
    begin = math.min(start, decoded - 1)
    end = math.max(math.min(start + shape, decoded), begin + 1)
    images = fn.decoders.image_slice(
        encoded, begin, end - begin, axis_names="HW", device=decoder, output_type=types.RGB, **split
    )
    return images, start - begin


def padded_regions(images, shifts, regions):
    """The regions of :func:`decode_regions` at their full shape, zero where they leave the decoded
    image: every box of DALI's views then lies inside its image (DALI's CPU resize crashes on a ROI
    wholly outside one, seen with DALI 2.4). Torch's views pad by themselves and skip this copy."""
    return fn.slice(
        images, start=shifts, shape=regions[2:4], axis_names="HW", out_of_bounds_policy="pad", fill_values=0
    )


def imagenet_view(images, box, flip, hole, view_size: int):
    """The box (top, left, height, width) resized to ``view_size`` squared (bilinear, antialiased), mirrored
    on ``flip``. The box lies inside ``images`` (:func:`padded_regions`)."""
    box = fn.cast(box, dtype=types.FLOAT)
    view = fn.resize(
        images,
        size=(view_size, view_size),
        roi_start=box[0:2],
        roi_end=box[0:2] + box[2:4],
        roi_relative=False,
        antialias=True,
        interp_type=types.INTERP_LINEAR,
    )
    return fn.flip(view, horizontal=flip)


def cifar_view(images, box, flip, hole, view_size: int):
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


def param_outputs(augment: str, auto_ops: int) -> list[str]:
    """Which of :data:`PARAM_TYPES` a loader's graph takes: the regions to decode, boxes and flips
    (and holes for cifar), then the auto-augment ops, bins and signs when there are ops to apply."""
    crop = ["regions", "boxes", "flips"] + ["holes"] * (augment == "cifar")
    return crop + ["ops", "bins", "signs"] * bool(auto_ops)


def read_samples(samples: SampleSource, params: Sequence[str] = ()):
    """The pass's samples' encoded bytes and labels (and the ``params`` of :data:`PARAM_TYPES`
    the source also serves), from the reader stage (:mod:`dali_ba.loading.reader`)."""
    dtypes = [types.UINT8, types.INT32] + [PARAM_TYPES[name] for name in params]
    return fn.external_source(samples, num_outputs=len(dtypes), batch_info=True, dtype=dtypes)


def _read_and_decode(
    samples: SampleSource, decoder: str, params: Sequence[str] = (), hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD
):
    """The samples decoded to RGB (only their regions, when ``params`` has ``regions``: then with
    their ``shifts``), their labels and the ``params`` by name; on the mixed decoder with
    ``hw_decoder_load`` of each batch for the hardware JPEG decoder (the rest on CUDA), never DALI's
    default, which changed between releases."""
    encoded, label, *drawn = read_samples(samples, params)
    # the cpu decoder has no such split
    split: dict[str, Any] = {"hw_decoder_load": hw_decoder_load} if decoder == "mixed" else {}
    named = dict(zip(params, drawn))
    if "regions" in named:
        images, named["shifts"] = decode_regions(encoded, named["regions"], decoder, **split)
    else:
        images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, **split)
    return images, label, named


@pipeline_def(**EXECUTOR)
def decode_pipeline(
    samples: SampleSource,
    decoder: str = "cpu",
    hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD,
    params: Sequence[str] = (),
):
    """The CPU path's graph: per sample, the decoded (H, W, 3) uint8 image (sizes vary) and its label.
    With ``params`` (:func:`param_outputs`), only each image's region is decoded (:func:`decode_regions`),
    and its shift and the view parameters after ``regions`` come out with it, as the source served
    them: torch's view stage renders the batch from them."""
    images, label, drawn = _read_and_decode(samples, decoder, params, hw_decoder_load)
    if not params:
        return images, label
    return images, label, drawn["shifts"], *[drawn[name] for name in params[1:]]


def _batch_augment_graph(
    samples: SampleSource,
    views: int,
    view_size: int,
    augment: str = "imagenet",
    decoder: str = "mixed",
    hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD,
):
    """A sample per DALI sample, its M views stacked: M view branches off one decode."""
    images, label, drawn = _read_and_decode(samples, decoder, param_outputs(augment, 0), hw_decoder_load)
    images = padded_regions(images, drawn["shifts"], drawn["regions"])
    boxes, flips, holes = drawn["boxes"], fn.cast(drawn["flips"], dtype=types.INT32), drawn.get("holes")
    make_view = VIEW_GRAPHS["cifar" if augment == "cifar" else "imagenet"]
    out = [make_view(images, boxes[m], flips[m], holes if holes is None else holes[m], view_size) for m in range(views)]
    return fn.stack(*out), label


def _view_slots_graph(
    samples: SampleSource,
    views: int,
    view_size: int,
    augment: str,
    auto_ops: int,
    decoder: str = "mixed",
    hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD,
):
    """A view per DALI sample: the batch is B samples' M view slots each, the sample's bytes in its
    first slot (the others empty). Each sample's region is decoded once (:func:`in_every_view_slot`),
    then each auto-augment op is one ``select`` over all B·M views: a graph whose size does not grow
    with M (a branch per view made it M × n × 14 branches, dearer per view as M grew)."""
    encoded, label, regions, boxes, flips, ops, bins, signs = read_samples(samples, param_outputs(augment, auto_ops))
    split: dict[str, Any] = {"hw_decoder_load": hw_decoder_load} if decoder == "mixed" else {}
    images = in_every_view_slot(encoded, regions, views, decoder, **split)
    view = imagenet_view(images, boxes, fn.cast(flips, dtype=types.INT32), None, view_size)
    return auto_augment_view(view, dali_suite(augment), ops, bins, signs, auto_ops), label


def in_every_view_slot(encoded, regions, views: int, decoder: str, **split):
    """Each sample's region (:func:`padded_regions`) in each of its ``views`` slots: decoded in its
    first slot only (a conditional: the later slots' bytes are empty), then copied to the later ones
    (``permute_batch``). Needs ``enable_conditionals``; with one view per sample, a plain decode."""
    if views == 1:
        images, shifts = decode_regions(encoded, regions, decoder, **split)
        return padded_regions(images, shifts, regions)
    if encoded.shape()[0] > 0:  # a sample's first slot
        images, shifts = decode_regions(encoded, regions, decoder, **split)
        images = padded_regions(images, shifts, regions)
    else:  # nothing to decode: an empty image, never read (the copy below skips it)
        images = fn.reshape(encoded, shape=[-1, 1, 1], layout="HWC")
        images = images.gpu() if decoder == "mixed" else images
    # every batch is whole (a pass serves whole batches): the slots' first slots are fixed
    first_slots = [slot - slot % views for slot in range(Pipeline.current().max_batch_size)]
    return fn.permute_batch(images, indices=first_slots)


_views_pipeline = pipeline_def(_batch_augment_graph, **EXECUTOR)
_view_slots_pipeline = pipeline_def(_view_slots_graph, enable_conditionals=True, **EXECUTOR)


def batch_augment_pipeline(*, augment: str = "imagenet", auto_ops: int = 0, batch_size: int, views: int, **kwargs):
    """The GPU path's graph for batches of ``batch_size`` B samples, each as ``views`` M views of
    one decode (``view_size`` squared, uint8 HWC).

    ``samples`` serves, after the bytes and labels, the batch's view parameters of
    :func:`param_outputs`: regions (B, 4) int32, boxes (B, M, 4), flips (B, M), holes (B, M, 4); it
    yields per sample (M, view_size, view_size, 3) and its label. For ``trivial`` and
    ``randaugment`` (:func:`views_as_samples`), with ``auto_ops`` n > 0, the batch is instead B·M
    view slots (:func:`_view_slots_graph`), served by a source of ``views`` slots per sample: per
    slot its region (B·M, 4), box, flip, ops, magnitude bins and signs (B·M, n) as int32 (see
    :class:`dali_ba.loading.augment.ViewParams`); it yields per slot one (view_size, view_size, 3)
    view and its sample's label, a sample's views in consecutive slots.
    """
    if augment in AUTO_OPS and not auto_ops:
        raise ValueError(f"augment {augment!r} needs auto_ops >= 1")
    if views_as_samples(augment, auto_ops):
        return _view_slots_pipeline(
            augment=augment, auto_ops=auto_ops, views=views, batch_size=batch_size * views, **kwargs
        )
    return _views_pipeline(augment=augment, views=views, batch_size=batch_size, **kwargs)


def views_as_samples(augment: str, auto_ops: int) -> bool:
    """Whether the GPU path's graph takes a view per DALI sample (B·M of them) rather than a
    sample's M views stacked: for the auto-augmentations, whose ops cost per operator."""
    return bool(auto_ops) and augment in AUTO_OPS


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
