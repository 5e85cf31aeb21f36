"""The loader API: batches of B samples x M augmented views, as torch tensors on the training device.

    loader = BatchAugmentLoader("imagenet/train", batch_size=64, views=4, view_size=224,
                                rank=hvd.rank(), world_size=hvd.size(), seed=0)
    for epoch in range(epochs):
        for images, labels in loader.epoch(epoch):        # (B, M, 3, H, W) uint8, (B,) int64
            x, y = flatten_views(images, labels)          # (B*M, 3, H, W), (B*M,)
            loss = F.cross_entropy(model(normalize(x)), y)

The rank, world size and device are plain arguments: launching and process groups stay outside.
A yielded batch is only valid until the next one is requested; ``.clone()`` what you keep.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any
import numpy as np
import torch

from dali_ba.data.dataset import ImageDataset, load_dataset
from dali_ba.data.partition import eval_shard, train_shard
from dali_ba.device import default_device, to_device
from dali_ba.errors import UnreadableImageError, UsageError
from dali_ba.install_choice import DEFAULT_HW_DECODER_LOAD
from dali_ba.loading.augment import Augmentation
from dali_ba.loading.pipeline import batch_augment_pipeline, center_crop_pipeline, decode_pipeline, param_outputs
from dali_ba.loading.reader import DEFAULT_MAX_IMAGE_PIXELS, Plan, SampleSource, new_size_cache
from dali_ba.loading.views import TorchViews

DECODERS = ("auto", "cpu", "mixed")
STAGES = ("torch", "dali")  # who makes the training views (BatchAugmentLoader.epoch)
PREFETCH_DEPTH = 2  # DALI's default prefetch_queue_depth: batches decoded ahead of the one yielded
# What "the same views whatever the number of ranks" allows on the mixed decoder: DALI's hybrid
# decoder splits a batch between the hardware JPEG decoder and CUDA (hw_decoder_load), which round
# differently, so a sample's pixels may depend on its place in a batch (and so on the number of
# ranks) by a grey level or so; its views' geometry (boxes, flips, ops) never does. On the cpu
# decoder the views are bit-identical.
MIXED_DECODE_TOLERANCE = 3  # grey levels, any pixel
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def flatten_views(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M, 3, H, W) + (B,) -> (B*M, 3, H, W) + (B*M,): the M copies of a sample stay adjacent."""
    views = images.shape[1]
    return images.flatten(0, 1), labels.repeat_interleave(views)


def normalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 channels_last, (x/255 - mean)/std, on the tensor's own device."""
    x = images.to(memory_format=torch.channels_last).float()
    shift, scale = _normalization(x.device, tuple(mean), tuple(std))
    return x.sub_(shift).div_(scale)


@functools.lru_cache(maxsize=16)
def _normalization(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) of :func:`normalize` on ``device``, made once: a copy to the GPU per step is a sync."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255, torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def _undecodable(dataset: ImageDataset, indices: Sequence[int]) -> dict[str, str]:
    """{name: reason} for the samples Pillow cannot fully decode (asked only after DALI has failed)."""
    from dali_ba.loading.probe import decode_problem

    found = {}
    for index in dict.fromkeys(indices):  # once each, in order
        reason = decode_problem(dataset.open(index))
        if reason:
            found[dataset.files[index]] = reason
    return found


def _resolve_decoder(decoder: str) -> str:
    if decoder not in DECODERS:
        raise UsageError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    if decoder == "mixed" and not torch.cuda.is_available():
        raise UsageError("decoder 'mixed' needs a visible GPU; use 'cpu' or 'auto'")
    return decoder


def _checked_hw_decoder_load(load: float) -> float:
    """The mixed decoder's share for the hardware JPEG decoder (ignored by the cpu decoder): 0 to 1."""
    if not 0 <= load <= 1:
        raise UsageError(f"hw_decoder_load must be between 0 and 1, got {load}")
    return float(load)


def _as_dataset(data: ImageDataset | str | os.PathLike) -> ImageDataset:
    return data if isinstance(data, ImageDataset) else load_dataset(data)


class _Feed:
    """A DALI pipeline built once for the run and the source that feeds it: each pass hands the
    source a new plan (and resets the pipeline), so large graphs are not rebuilt every epoch. A
    pass left before its end (``itertools.islice``, a ``break``) is drained when the next starts."""

    def __init__(self, pipe, source: SampleSource, iterate: bool) -> None:
        self.pipe, self.source, self._iterate = pipe, source, iterate
        self._iterator = None
        self._started = self._open = False

    def run(self, plan: Plan) -> Iterator:
        """The plan's batches: (images, labels) torch tensors through DALI's torch iterator
        (``iterate``), else the pipeline's own (TensorList, TensorList) outputs."""
        if self._open:
            self.source.stop()
            for _ in self._outputs():
                pass
        self.source.start(plan)
        if self._started:
            self._iterator.reset() if self._iterate else self.pipe.reset()
        self._started = self._open = True
        yield from self._outputs()
        self._open = False

    def _outputs(self) -> Iterator:
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

        if self._iterator is None:  # builds the pipeline and prefetches from the plan just started
            self._iterator = DALIGenericIterator(self.pipe, ["images", "labels"], last_batch_policy=LastBatchPolicy.DROP,
                                                 auto_reset=False)
        while True:  # next(), not a for loop: DALI's iterator resets itself in __iter__ after an end
            try:
                (batch,) = next(self._iterator)
            except StopIteration:
                return
            yield batch["images"], batch["labels"]


class _ShardedLoader:
    """What both loaders share: a dataset, a rank's place in the world, and the DALI plumbing."""

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
        self.decoder = _resolve_decoder(decoder)
        if self.decoder == "mixed":
            self.device_id = torch.cuda.current_device()
            self.device = torch.device(device) if device is not None else torch.device("cuda", self.device_id)
        else:
            self.device_id = None
            self.device = torch.device(device) if device is not None else default_device()
        self._files = np.array(self.dataset.files, dtype=object)  # not fixed-width: ImageNet is 1.28M paths
        self._labels = np.array(self.dataset.labels, dtype=np.int32)
        eval_shard(len(self.dataset), rank, world_size, batch_size)  # raises on more ranks than samples
        # Broken files found so far ({path: reason}); loaders of one run may share the dict. Training
        # refills a broken file's slot with another sample of its batch, evaluation leaves it out.
        self.bad_files: dict[str, str] = {}
        self.max_bad_files = max(10, len(self.dataset) // 100)
        self.on_bad_file: Callable[[str, str], None] | None = None  # told of each new broken file
        self.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS  # larger images (by their header) are broken files, never decoded; 0: no limit
        self.sizes = new_size_cache(self.dataset)  # decoded sizes from headers, read once per run (shareable)
        self._feeds: dict[str, _Feed] = {}  # a pipeline per kind of pass, built once

    def _broken(self, indices: np.ndarray) -> np.ndarray:
        """Which of the samples ``indices`` are known broken files."""
        if not self.bad_files:
            return np.zeros(len(indices), dtype=bool)
        return np.fromiter((path in self.bad_files for path in self._files[indices]), dtype=bool, count=len(indices))

    def _refilled(self, order: np.ndarray) -> np.ndarray:
        """``order`` (whole batches) with each known-broken sample replaced by the first good sample of
        its batch (of the whole order if its batch has none): what the pipeline reads."""
        broken = self._broken(order)
        if not broken.any():
            return order
        if broken.all():
            raise UnreadableImageError(f"every file of rank {self.rank}'s share is broken ({len(self.bad_files)} found, "
                                       f"e.g. {next(iter(self.bad_files))}); check the data with python -m dali_ba.check_data")
        refilled, fallback = order.copy(), order[~broken][0]
        for at in range(0, len(order), self.batch_size):
            batch, bad = refilled[at : at + self.batch_size], broken[at : at + self.batch_size]
            good = batch[~bad]
            batch[bad] = good[0] if len(good) else fallback
        return refilled

    def _plan(self, epoch: int, order: np.ndarray) -> Plan:
        """A pass over ``order`` (whole batches): each slot keeps its sample's views, known broken
        samples are refilled."""
        return Plan(epoch, order, self._refilled(order), self.batch_size)

    def _source(self, params: Callable | None = None) -> SampleSource:
        return SampleSource(self.dataset, self.sizes, self._remember, params, self.max_image_pixels)

    def _run_args(self, seed: int) -> dict:
        """Where and how a pipeline of this loader runs."""
        return dict(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id, seed=seed)

    def _pipeline_args(self, order: np.ndarray, seed: int, params: Callable | None = None) -> dict:
        """Arguments of a one-off pipeline over ``order``: its source, already started, the decoder
        and where it runs (for benchmarks and tests: the loader itself keeps one per kind of pass)."""
        source = self._source(params)
        source.start(self._plan(0, order))
        return dict(samples=source, decoder=self.decoder, **self._run_args(seed))

    def _feed(self, kind: str, make: Callable[[SampleSource], Any], params: Callable | None = None, iterate: bool = True) -> _Feed:
        """The loader's pipeline for ``kind`` of pass (``make(source)`` builds its graph), built once."""
        feed = self._feeds.get(kind)
        if feed is None:
            source = self._source(params)
            feed = self._feeds[kind] = _Feed(make(source), source, iterate)
        return feed

    def _dali_batches(self, batches: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A pass of DALI's torch tensors, moved to ``self.device``."""
        for images, labels in batches:
            yield to_device(images, self.device), to_device(labels.view(-1), self.device).long()

    def _recovering(self, make: Callable[[int], Iterator], order: np.ndarray, start: int) -> Iterator:
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
                found = _undecodable(self.dataset, [i for i in suspects if self._files[i] not in self.bad_files])
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
                f"(e.g. {path}: {reason}); check the data with python -m dali_ba.check_data {self.dataset.source}")


class BatchAugmentLoader(_ShardedLoader):
    """Training batches: each of B samples decoded once and seen as M independently augmented views.

    Yields ``images`` (B, M, 3, H, W) uint8 in channels_last memory and ``labels`` (B,) int64. Each
    epoch reshuffles the whole dataset from (seed, epoch) and deals it out to ranks; every rank gets
    the same number of steps (see :func:`dali_ba.data.partition.train_shard`). The views of sample i
    in epoch e depend only on (seed, e, i) (:mod:`dali_ba.loading.augment`), whatever the number of ranks.
    On the "cpu" decoder torch makes the views in ``num_threads`` threads (:mod:`dali_ba.loading.views`);
    on "mixed" DALI's GPU operators do, from the same parameters. ``stage`` chooses otherwise:
    "torch" with "mixed" decodes on the CPU (torch's view stage is CPU code), "dali" with "cpu"
    runs the GPU path's graph on DALI's CPU operators.
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
    ) -> None:
        if views < 1:
            raise UsageError(f"views must be >= 1, got {views}")
        self.hw_decoder_load = _checked_hw_decoder_load(hw_decoder_load)
        if stage not in (None, *STAGES):
            raise UsageError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        self.augmentation = Augmentation(augment, view_size, crop_area_min, seed, randaugment_n, randaugment_m)  # checks them
        self.views, self.view_size, self.augment, self.crop_area_min = views, view_size, augment, crop_area_min
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
        comparisons). The loader's own passes run through one such pipeline per stage, kept."""
        source = self._source(None if self._stage(stage) == "torch" else self._view_params)
        source.start(self._plan(epoch, self.shard(epoch)[start * self.batch_size :]))
        return self._graph(source, stage)

    def _graph(self, source: SampleSource, stage: str | None):
        if self._stage(stage) == "torch":  # torch's view stage works on the CPU: decode there
            return decode_pipeline(samples=source, decoder="cpu", **self._run_args(self.seed))
        return batch_augment_pipeline(samples=source, views=self.views, view_size=self.view_size, augment=self.augment,
                                      auto_ops=self.augmentation.auto_ops, decoder=self.decoder,
                                      hw_decoder_load=self.hw_decoder_load, **self._run_args(self.seed))

    def _view_params(self, epoch: int, slots: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
        """The arrays the view graph takes for a batch (:func:`dali_ba.loading.pipeline.param_outputs`)."""
        drawn = self.augmentation.draw(epoch, slots, sizes, self.views)
        arrays = (drawn.boxes, drawn.flips, drawn.holes, drawn.ops, drawn.magnitude_bins, drawn.signs.astype(np.int32))
        return [arrays[i] for i in param_outputs(self.augment, self.augmentation.auto_ops)]

    def _stage(self, stage: str | None = None) -> str:
        """Who makes the views: ``stage`` if given, else the loader's (torch on the cpu decoder and
        DALI on mixed, unless the loader was made with another)."""
        if stage is None:
            return self.stage
        if stage not in STAGES:
            raise UsageError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        return stage

    def epoch(self, epoch: int, state: dict | None = None, stage: str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
            plan = self._plan(epoch, order[position * self.batch_size :])
            if stage == "torch":
                feed = self._feed(stage, lambda source: self._graph(source, stage), iterate=False)
                return self._torch_batches(feed.run(plan), plan)
            feed = self._feed(stage, lambda source: self._graph(source, stage), self._view_params)
            return self._dali_batches(feed.run(plan))

        for images, labels in self._recovering(batches_from, order, start):
            self._position = (epoch, self._position[1] + 1)
            yield images.permute(0, 1, 4, 2, 3), labels

    def _torch_batches(self, decoded_batches: Iterator, plan: Plan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """DALI decodes; torch's view stage renders each batch into its reused buffer."""
        if self._torch_views is None:
            self._torch_views = TorchViews(self.num_threads, self.batch_size, self.views, self.view_size)
        for batch, (decoded, labels) in enumerate(decoded_batches):
            images = [np.asarray(decoded[i]) for i in range(len(decoded))]
            slots = plan.batch(batch)[0]  # a refilled slot keeps its own sample's views
            params = self.augmentation.draw(plan.epoch, slots, [image.shape[:2] for image in images], self.views)
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
        self.hw_decoder_load = _checked_hw_decoder_load(hw_decoder_load)
        self.resize, self.crop = resize, crop
        super().__init__(data, batch_size, rank, world_size, decoder, device, num_threads, seed=0)

    def __len__(self) -> int:
        return len(eval_shard(len(self.dataset), self.rank, self.world_size, self.batch_size)[0]) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, real = eval_shard(len(self.dataset), self.rank, self.world_size, self.batch_size)

        def batches_from(position: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            feed = self._feed("center_crop", lambda source: center_crop_pipeline(
                samples=source, resize=self.resize, crop=self.crop, decoder=self.decoder,
                hw_decoder_load=self.hw_decoder_load, **self._run_args(0)))
            return self._dali_batches(feed.run(self._plan(0, order[position * self.batch_size :])))

        for position, batch in enumerate(self._recovering(batches_from, order, 0)):
            kept = _evaluated(self, order, real, position, *batch)
            if kept:
                yield kept[0].permute(0, 3, 1, 2), kept[1]


def _evaluated(loader: _ShardedLoader, order: np.ndarray, real: int, position: int, images: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
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
