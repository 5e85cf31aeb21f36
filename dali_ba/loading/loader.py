"""The loader API: batches of B samples x M augmented views, as torch tensors on the training device.

    loader = BatchAugmentLoader("imagenet/train", batch_size=64, views=4, view_size=224,
                                rank=hvd.rank(), world_size=hvd.size(), seed=0)
    for epoch in range(epochs):
        for images, labels in loader.epoch(epoch):        # (B, M, 3, H, W) uint8, (B,) int64
            x, y = flatten_views(images, labels)          # (B*M, 3, H, W), (B*M,)
            loss = F.cross_entropy(model(normalize(x)), y)

The rank, world size and device are plain arguments: launching and process groups stay outside.
A yielded batch is only valid until the next one is requested; ``.clone()`` what you keep.

Here are the three loaders (:class:`BatchAugmentLoader` for training, :class:`ValidationLoader` and
:class:`AugmentedValidationLoader` for evaluation, whose padding is cut off by :func:`_evaluated`) and
what they share. What they are made of is beside them: the DALI pipeline kept for the run and the
decoder choice in :mod:`~dali_ba.loading.feed`, broken-file recovery in :mod:`~dali_ba.loading.recovery`,
the bytes read in :mod:`~dali_ba.loading.reader`, the graphs in :mod:`~dali_ba.loading.pipeline`.
``flatten_views`` and ``normalize``, for the batches they yield, are :mod:`dali_ba.loading.tensors`'s
(``from dali_ba import flatten_views, normalize``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from dali_ba.data.dataset import ImageDataset, load_dataset
from dali_ba.data.partition import eval_shard, train_shard
from dali_ba.device import default_device, to_device
from dali_ba.errors import UsageError
from dali_ba.loading.augment import Augmentation, rendered_params, view_regions
from dali_ba.loading.feed import DEFAULT_HW_DECODER_LOAD, Feed, checked_hw_decoder_load, resolve_decoder
from dali_ba.loading.pipeline import (
    batch_augment_pipeline,
    center_crop_pipeline,
    decode_pipeline,
    param_outputs,
    views_as_samples,
)
from dali_ba.loading.reader import DEFAULT_MAX_IMAGE_PIXELS, DataPass, SampleSource, new_size_cache
from dali_ba.loading.recovery import BadFileRecovery
from dali_ba.loading.views import TorchViews

STAGES = ("torch", "dali")  # who makes the training views (BatchAugmentLoader.epoch)


def _as_dataset(data: ImageDataset | str | os.PathLike) -> ImageDataset:
    return data if isinstance(data, ImageDataset) else load_dataset(data)


class _ShardedLoader(BadFileRecovery):
    """What both loaders share: a dataset, a rank's place in the world, and the DALI plumbing (the
    broken files met on the way: :class:`~dali_ba.loading.recovery.BadFileRecovery`)."""

    def __init__(
        self,
        data: ImageDataset | str | os.PathLike,
        batch_size: int,
        rank: int,
        world_size: int,
        decoder: str,
        device: torch.device | str | None,
        num_threads: int,
        seed: int,
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if num_threads < 1:
            raise UsageError(f"num_threads must be >= 1, got {num_threads}")
        self.dataset = _as_dataset(data)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_threads, self.seed = num_threads, seed
        self.decoder = resolve_decoder(decoder)
        if self.decoder == "mixed":
            self.device_id: int | None = torch.cuda.current_device()
            self.device = torch.device(device) if device is not None else torch.device("cuda", self.device_id)
        else:
            self.device_id = None
            self.device = torch.device(device) if device is not None else default_device()
        eval_shard(len(self.dataset), rank, world_size, batch_size)  # raises on more ranks than samples
        # Broken files found so far ({path: reason}); loaders of one run may share the dict. Training
        # refills a broken file's slot with another sample of its batch, evaluation leaves it out.
        self.bad_files: dict[str, str] = {}
        self.max_bad_files = max(10, len(self.dataset) // 100)
        self.on_bad_file: Callable[[str, str], None] | None = None  # told of each new broken file
        self.max_image_pixels = (
            DEFAULT_MAX_IMAGE_PIXELS  # larger images (by their header) are broken files, never decoded; 0: no limit
        )
        self.sizes = new_size_cache(self.dataset)  # decoded sizes from headers, read once per run (shareable)
        self._feeds: dict[str, Feed] = {}  # a pipeline per kind of pass, built once

    def _data_pass(self, epoch: int, order: np.ndarray) -> DataPass:
        """A pass over ``order`` (whole batches): each slot keeps its sample's views, known broken
        samples are refilled."""
        return DataPass(epoch, order, self._refilled(order), self.batch_size)

    def _source(self, params: Callable | None = None, views_per_sample: int = 1) -> SampleSource:
        return SampleSource(self.dataset, self.sizes, self._remember, params, self.max_image_pixels, views_per_sample)

    def _run_args(self, seed: int) -> dict:
        """Where and how a pipeline of this loader runs."""
        return dict(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id, seed=seed)

    def _pipeline_args(self, order: np.ndarray, seed: int, params: Callable | None = None) -> dict:
        """Arguments of a one-off pipeline over ``order``: its source, already started, the decoder
        and where it runs (for benchmarks and tests: the loader itself keeps one per kind of pass)."""
        source = self._source(params)
        source.start(self._data_pass(0, order))
        return dict(samples=source, decoder=self.decoder, **self._run_args(seed))

    def _feed(
        self,
        kind: str,
        make: Callable[[SampleSource], Any],
        params: Callable | None = None,
        iterate: bool = True,
        views_per_sample: int = 1,
    ) -> Feed:
        """The loader's pipeline for ``kind`` of pass (``make(source)`` builds its graph), built once."""
        feed = self._feeds.get(kind)
        if feed is None:
            source = self._source(params, views_per_sample)
            feed = self._feeds[kind] = Feed(make(source), source, iterate)
        return feed

    def source_time(self) -> tuple[float, int]:
        """The seconds the caller's thread (DALI calls a source inside ``next()``) spent in this loader's
        sources so far, and the batches they handed over: what reading costs the training thread."""
        sources = [feed.source for feed in self._feeds.values()]
        return sum(s.callback_seconds for s in sources), sum(s.callback_batches for s in sources)

    def _dali_batches(self, batches: Iterator, view_slots: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A pass of DALI's torch tensors, moved to ``self.device``; from a graph of ``view_slots`` M
        slots per sample (a view per DALI sample), the B·M views as (B, M, ...) (no copy) and each
        sample's label."""
        for images, labels in batches:
            labels = labels.view(-1)
            if view_slots:
                images, labels = images.unflatten(0, (-1, view_slots)), labels[::view_slots]
            yield to_device(images, self.device), to_device(labels, self.device).long()


class BatchAugmentLoader(_ShardedLoader):
    """Training batches: each of B samples decoded once and seen as M independently augmented views.

    Yields ``images`` (B, M, 3, H, W) uint8 in channels_last memory and ``labels`` (B,) int64. Each
    epoch reshuffles the whole dataset from (seed, epoch) and deals it out to ranks; every rank gets
    the same number of steps (see :func:`dali_ba.data.partition.train_shard`). The views of sample i
    in epoch e depend only on (seed, e, i) (:mod:`dali_ba.loading.augment`), whatever the number of ranks.
    On the "cpu" decoder torch makes the views in ``num_threads`` threads (:mod:`dali_ba.loading.views`);
    on "mixed" DALI's GPU operators do, from the same parameters. ``stage`` chooses otherwise:
    "torch" with "mixed" decodes on the CPU (torch's view stage is CPU code), "dali" with "cpu"
    runs the GPU path's graph on DALI's CPU operators. Either way only the part of each image that
    its views read is decoded (the union of its M boxes; ``roi_decode`` False: the whole image).
    """

    def __init__(
        self,
        data: ImageDataset | str | os.PathLike,
        batch_size: int,
        views: int = 4,
        view_size: int = 224,
        *,
        augment: str = "imagenet",
        crop_area_min: float = 0.08,
        randaugment_n: int = 2,
        randaugment_m: int = 9,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        decoder: str = "auto",
        device: torch.device | str | None = None,
        num_threads: int = 2,
        stage: str | None = None,
        hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD,
        roi_decode: bool = True,
    ) -> None:
        if views < 1:
            raise UsageError(f"views must be >= 1, got {views}")
        self.hw_decoder_load = checked_hw_decoder_load(hw_decoder_load)
        if stage not in (None, *STAGES):
            raise UsageError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        self.augmentation = Augmentation(
            augment, view_size, crop_area_min, seed, randaugment_n, randaugment_m
        )  # checks them
        self.views, self.view_size, self.augment, self.crop_area_min = views, view_size, augment, crop_area_min
        self.roi_decode = roi_decode  # decode only the union of each sample's boxes (False: the whole image)
        super().__init__(data, batch_size, rank, world_size, decoder, device, num_threads, seed)
        self._next_epoch = 0
        self._position: tuple[int, int] | None = None  # (epoch, batches yielded in it) once an epoch started
        self._torch_views: TorchViews | None = None
        self.stage = stage or ("torch" if self.decoder == "cpu" else "dali")  # who makes the views by default

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        return len(self.shard(0)) // self.batch_size

    def shard(self, epoch: int) -> np.ndarray:
        """Dataset indices this rank reads in ``epoch``, in order."""
        return train_shard(len(self.dataset), self.rank, self.world_size, self.batch_size, self.seed, epoch)

    def build_pipeline(self, epoch: int, start: int = 0, stage: str | None = None):
        """A new DALI pipeline (not yet built) for ``epoch`` of this rank from batch ``start``:
        decoding only when torch makes the views (``stage`` "torch", the cpu decoder's), decoding and
        views otherwise ("dali", the mixed decoder's; on the cpu decoder, only for tests and
        comparisons). The loader's own passes run through one such pipeline per stage, kept. For
        ``trivial`` and ``randaugment``, DALI's graph has a view per sample: a batch of B·M views
        (:func:`dali_ba.loading.pipeline.batch_augment_pipeline`), a sample's M in a row."""
        source = self._source(self._params(stage), self._view_slots(stage) or 1)
        source.start(self._data_pass(epoch, self.shard(epoch)[start * self.batch_size :]))
        return self._graph(source, stage)

    def _graph(self, source: SampleSource, stage: str | None):
        if self._stage(stage) == "torch":  # torch's view stage works on the CPU: decode there
            params = param_outputs(self.augment, self.augmentation.auto_ops)
            return decode_pipeline(samples=source, decoder="cpu", params=params, **self._run_args(self.seed))
        return batch_augment_pipeline(  # on a source of _view_slots(stage) slots per sample, if any
            samples=source,
            views=self.views,
            view_size=self.view_size,
            augment=self.augment,
            auto_ops=self.augmentation.auto_ops,
            decoder=self.decoder,
            hw_decoder_load=self.hw_decoder_load,
            **self._run_args(self.seed),
        )

    def _view_slots(self, stage: str | None) -> int:
        """M where the ``stage``'s graph takes a view per DALI sample, M slots per sample
        (:func:`dali_ba.loading.pipeline.views_as_samples`); 0 where it takes a sample per DALI sample."""
        slots = self._stage(stage) == "dali" and views_as_samples(self.augment, self.augmentation.auto_ops)
        return self.views if slots else 0

    def _params(self, stage: str | None) -> Callable | None:
        """What the ``stage``'s source serves after each batch's bytes and labels: :meth:`_view_params`,
        per view slot where each view is a DALI sample."""
        views, draw = self._view_slots(stage), self._view_params
        if not views or draw is None:
            return draw

        def per_view_slot(epoch: int, slots: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
            names = param_outputs(self.augment, self.augmentation.auto_ops)
            # a sample's region in each of its slots (only the first decodes it), a view's own parameters in its slot
            return [
                np.repeat(array, views, axis=0) if name == "regions" else array.reshape(-1, *array.shape[2:])
                for name, array in zip(names, draw(epoch, slots, sizes))
            ]

        return per_view_slot

    def _view_params(self, epoch: int, slots: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
        """The arrays a graph takes for a batch (:func:`dali_ba.loading.pipeline.param_outputs`), drawn
        at the headers' sizes: the regions to decode and the boxes moved into them."""
        drawn = self.augmentation.draw(epoch, slots, sizes, self.views)
        regions, boxes = view_regions(drawn.boxes, sizes, union=self.roi_decode)
        arrays = dict(
            regions=regions,
            boxes=boxes,
            flips=drawn.flips,
            holes=drawn.holes,
            ops=drawn.ops,
            bins=drawn.magnitude_bins,
            signs=drawn.signs.astype(np.int32),
        )
        return [arrays[name] for name in param_outputs(self.augment, self.augmentation.auto_ops)]

    def _stage(self, stage: str | None = None) -> str:
        """Who makes the views: ``stage`` if given, else the loader's (torch on the cpu decoder and
        DALI on mixed, unless the loader was made with another)."""
        if stage is None:
            return self.stage
        if stage not in STAGES:
            raise UsageError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        return stage

    def epoch(
        self, epoch: int, state: dict | None = None, stage: str | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate one epoch: ``len(self)`` batches of (B, M, 3, H, W) images and (B,) labels.

        With a ``state`` from :meth:`state`, carry on where that epoch stopped: the same remaining
        samples under the same augmentations as an uninterrupted pass. ``stage`` overrides who
        makes the views ("torch" or "dali", see :meth:`build_pipeline`). A file that cannot be
        decoded is added to ``bad_files`` and its slot refilled with another sample of its batch
        (under the views of its own slot): batches keep B samples and every rank its step count.
        """
        start = 0
        if state is not None:
            if state["epoch"] != epoch:
                raise UsageError(f"loader state is for epoch {state['epoch']}, not epoch {epoch}")
            start = state["batches"]
        self._next_epoch = epoch + 1
        self._position = (epoch, start)
        order = self.shard(epoch)
        if start * self.batch_size >= len(order):
            return  # the state of a finished epoch

        stage = self._stage(stage)

        def batches_from(position: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            data_pass = self._data_pass(epoch, order[position * self.batch_size :])
            if stage == "torch":
                feed = self._feed(stage, lambda source: self._graph(source, stage), self._view_params, iterate=False)
                return self._torch_batches(feed.run(data_pass))
            slots = self._view_slots(stage)
            feed = self._feed(stage, lambda source: self._graph(source, stage), self._params(stage), True, slots or 1)
            return self._dali_batches(feed.run(data_pass), slots)

        for images, labels in self._recovering(batches_from, order, start):
            self._position = (epoch, self._position[1] + 1)
            yield images.permute(0, 1, 4, 2, 3), labels

    def _torch_batches(self, decoded_batches: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """DALI decodes each sample's region and hands on the view parameters the reader drew with it
        (a refilled slot keeps its own sample's views); torch's view stage renders each batch into
        its reused buffer."""
        if self._torch_views is None:
            self._torch_views = TorchViews(self.num_threads, self.batch_size, self.views, self.view_size)
        names = param_outputs(self.augment, self.augmentation.auto_ops)[1:]  # what follows the regions
        for decoded, labels, shifts, *drawn in decoded_batches:
            images = [np.asarray(decoded[i]) for i in range(len(decoded))]
            arrays = {name: array.as_array() for name, array in zip(names, drawn)}
            # into each decoded part's pixels: the region's corner lies at its shift (zero but where a
            # header disagrees with its decoder); boxes reaching past the part read zero padding
            arrays["boxes"] = arrays["boxes"] + np.pad(shifts.as_array(), ((0, 0), (0, 2)))[:, None]
            params = rendered_params(self.augmentation.suite, **arrays)
            labels = torch.from_numpy(labels.as_array().reshape(-1).astype(np.int64))
            yield to_device(self._torch_views(images, params), self.device), to_device(labels, self.device)

    def state(self) -> dict:
        """Where this rank's loader is: the epoch and the batches already yielded (augmentations are
        a function of (seed, epoch, sample), so no RNG state is needed). Plain types only."""
        if self._position is None:
            raise RuntimeError("the loader has not started an epoch yet")
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(self._next_epoch)


class AugmentedValidationLoader(BatchAugmentLoader):
    """Evaluation batches under the training augmentation: every sample exactly once across ranks
    (as :class:`ValidationLoader`), each as ``views`` augmented views, the same ones on every pass.
    Yields (b, K, 3, H, W) uint8 and (b,) int64, for averaging the model's outputs over the K views."""

    def shard(self, epoch: int) -> np.ndarray:
        return eval_shard(len(self.dataset), self.rank, self.world_size, self.batch_size)[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, real = eval_shard(len(self.dataset), self.rank, self.world_size, self.batch_size)
        for position, batch in enumerate(self.epoch(0)):
            kept = _evaluated(self, order, real, position, *batch)
            if kept:
                yield kept


class ValidationLoader(_ShardedLoader):
    """Evaluation batches: resize shorter side + centre crop, one view per sample.

    Across ranks every sample is yielded exactly once per pass: ranks are padded to the same number
    of batches for the pipeline, and the padding is cut off before a batch is yielded (so the last
    batch of a rank may be shorter than ``batch_size``). Yields (b, 3, H, W) uint8 and (b,) int64.
    """

    def __init__(
        self,
        data: ImageDataset | str | os.PathLike,
        batch_size: int,
        resize: int = 256,
        crop: int = 224,
        *,
        rank: int = 0,
        world_size: int = 1,
        decoder: str = "auto",
        device: torch.device | str | None = None,
        num_threads: int = 2,
        hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD,
    ) -> None:
        if crop < 1 or resize < crop:
            raise UsageError(f"validation needs 1 <= crop <= resize, got crop {crop}, resize {resize}")
        self.hw_decoder_load = checked_hw_decoder_load(hw_decoder_load)
        self.resize, self.crop = resize, crop
        super().__init__(data, batch_size, rank, world_size, decoder, device, num_threads, seed=0)

    def __len__(self) -> int:
        return len(eval_shard(len(self.dataset), self.rank, self.world_size, self.batch_size)[0]) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, real = eval_shard(len(self.dataset), self.rank, self.world_size, self.batch_size)

        def batches_from(position: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            feed = self._feed(
                "center_crop",
                lambda source: center_crop_pipeline(
                    samples=source,
                    resize=self.resize,
                    crop=self.crop,
                    decoder=self.decoder,
                    hw_decoder_load=self.hw_decoder_load,
                    **self._run_args(0),
                ),
            )
            return self._dali_batches(feed.run(self._data_pass(0, order[position * self.batch_size :])))

        for position, batch in enumerate(self._recovering(batches_from, order, 0)):
            kept = _evaluated(self, order, real, position, *batch)
            if kept:
                yield kept[0].permute(0, 3, 1, 2), kept[1]


def _evaluated(
    loader: _ShardedLoader, order: np.ndarray, real: int, position: int, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The samples of evaluation batch ``position`` that count: not the padding that evens out the
    ranks (after the first ``real`` of ``order``), not a broken file (its slot was refilled); None if
    none does. Decided on the host and taken by an index, never a mask: a boolean-mask index waits
    for the GPU to learn its result's size."""
    at = position * loader.batch_size
    indices = order[at : at + loader.batch_size]
    keep = (np.arange(at, at + len(indices)) < real) & ~loader._broken(indices)
    if keep.all():
        return images, labels
    if not keep.any():
        return None
    index = to_device(torch.from_numpy(np.flatnonzero(keep)), images.device)
    return images.index_select(0, index), labels.index_select(0, index)
