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

import os
from collections.abc import Callable, Iterator, Sequence
from typing import IO

import numpy as np
import torch

from dali_ba.data.dataset import ImageDataset, load_dataset
from dali_ba.data.sharding import eval_shard, train_shard
from dali_ba.errors import UnreadableImageError, UsageError
from dali_ba.augment import Augmentation
from dali_ba.pipeline import READER_NAME, ShardSource, batch_augment_pipeline, center_crop_pipeline, decode_pipeline
from dali_ba.views import TorchViews

DECODERS = ("auto", "cpu", "mixed")
STAGES = ("torch", "dali")  # who makes the training views (BatchAugmentLoader.epoch)
PREFETCH_DEPTH = 2  # DALI's default prefetch_queue_depth: batches decoded ahead of the one yielded
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def flatten_views(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M, 3, H, W) + (B,) -> (B*M, 3, H, W) + (B*M,): the M copies of a sample stay adjacent."""
    views = images.shape[1]
    return images.flatten(0, 1), labels.repeat_interleave(views)


def normalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 channels_last, (x/255 - mean)/std, on the tensor's own device."""
    x = images.to(memory_format=torch.channels_last).float()
    scale = torch.tensor(std, device=x.device).view(1, 3, 1, 1) * 255
    shift = torch.tensor(mean, device=x.device).view(1, 3, 1, 1) * 255
    return x.sub_(shift).div_(scale)


def _undecodable(dataset: ImageDataset, indices: Sequence[int]) -> dict[str, str]:
    """{name: reason} for the samples Pillow cannot fully decode (asked only after DALI has failed)."""
    from dali_ba.check_data import decode_problem

    found = {}
    for index in dict.fromkeys(indices):  # once each, in order
        reason = decode_problem(dataset.open(index))
        if reason:
            found[dataset.files[index]] = reason
    return found


def image_sizes(images: Sequence[str | IO[bytes]]) -> np.ndarray:
    """(N, 2) decoded (height, width) of images (paths or open files), from their headers, after the
    EXIF rotation that DALI's decoder applies (orientations 5-8 swap the sides)."""
    from PIL import Image

    sizes = []
    for path in images:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.format == "JPEG" and image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        sizes.append((width, height) if turned else (height, width))
    return np.array(sizes, dtype=np.int64).reshape(-1, 2)


def _resolve_decoder(decoder: str) -> str:
    if decoder not in DECODERS:
        raise UsageError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    if decoder == "mixed" and not torch.cuda.is_available():
        raise UsageError("decoder 'mixed' needs a visible GPU; use 'cpu' or 'auto'")
    return decoder


def _as_dataset(data: ImageDataset | str | os.PathLike) -> ImageDataset:
    return data if isinstance(data, ImageDataset) else load_dataset(data)


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
            self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._files = np.array(self.dataset.files, dtype=object)  # not fixed-width: ImageNet is 1.28M paths
        self._labels = np.array(self.dataset.labels, dtype=np.int32)
        eval_shard(len(self.dataset), rank, world_size, batch_size)  # raises on more ranks than samples
        # Broken files found so far ({path: reason}); loaders of one run may share the dict. Training
        # refills a broken file's slot with another sample of its batch, evaluation leaves it out.
        self.bad_files: dict[str, str] = {}
        self.max_bad_files = max(10, len(self.dataset) // 100)
        self.on_bad_file: Callable[[str, str], None] | None = None  # told of each new broken file

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

    def _pipeline_args(self, order: np.ndarray, seed: int) -> dict:
        """Arguments every pipeline of this loader takes: the samples to read, in order (broken ones
        refilled), from files or from shards, and where to run."""
        readable = self._refilled(order)
        if self.dataset.members is None:
            samples = (self._files[readable].tolist(), self._labels[readable].tolist())
        else:
            samples = ShardSource(self.dataset.members, readable, self._labels[readable], self.batch_size)
        return dict(
            samples=samples,
            decoder=self.decoder,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=seed,
        )

    def _dali_batches(self, pipe) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Drive a pipeline for one pass; tensors land on ``self.device``."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        # The file reader knows its pass; the shards' external source ends it itself (StopIteration).
        extent = dict(reader_name=READER_NAME) if self.dataset.members is None else {}
        iterator = DALIGenericIterator(
            pipe, ["images", "labels"], last_batch_policy=LastBatchPolicy.DROP, auto_reset=False, **extent)
        for (batch,) in iterator:
            images = batch["images"].to(self.device, non_blocking=True)
            yield images, batch["labels"].view(-1).to(self.device, torch.int64, non_blocking=True)

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
    the same number of steps (see :func:`dali_ba.data.sharding.train_shard`). The views of sample i
    in epoch e depend only on (seed, e, i) (:mod:`dali_ba.augment`), whatever the number of ranks.
    On the "cpu" decoder torch makes the views in ``num_threads`` threads (:mod:`dali_ba.views`);
    on "mixed" DALI's GPU operators do, from the same parameters.
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
    ) -> None:
        if views < 1:
            raise UsageError(f"views must be >= 1, got {views}")
        self.augmentation = Augmentation(augment, view_size, crop_area_min, seed, randaugment_n, randaugment_m)  # checks them
        self.views, self.view_size, self.augment, self.crop_area_min = views, view_size, augment, crop_area_min
        super().__init__(data, batch_size, rank, world_size, decoder, device, num_threads, seed)
        self._next_epoch = 0
        self._position: tuple[int, int] | None = None  # (epoch, batches yielded in it) once an epoch started
        self._torch_views: TorchViews | None = None

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        return len(self.shard(0)) // self.batch_size

    def shard(self, epoch: int) -> np.ndarray:
        """Dataset indices this rank reads in ``epoch``, in order."""
        return train_shard(len(self.dataset), self.rank, self.world_size, self.batch_size, self.seed, epoch)

    def build_pipeline(self, epoch: int, start: int = 0, stage: str | None = None):
        """The DALI pipeline (not yet built) for ``epoch`` of this rank from batch ``start``: decoding
        only when torch makes the views (``stage`` "torch", the cpu decoder's), decoding and views
        otherwise ("dali", the mixed decoder's; on the cpu decoder, only for tests and comparisons)."""
        order = self.shard(epoch)[start * self.batch_size :]
        if self._stage(stage) == "torch":
            return decode_pipeline(**self._pipeline_args(order, seed=self.seed))

        readable = self._refilled(order)

        def params(info) -> tuple[np.ndarray, ...]:
            # The reader wraps round after the shard, so the iteration does too (DALI reads ahead).
            at = info.iteration * self.batch_size % len(order)
            indices = order[at : at + self.batch_size]  # a refilled slot keeps its own sample's views
            sizes = image_sizes([self.dataset.open(i) for i in readable[at : at + self.batch_size]])
            drawn = self.augmentation.draw(epoch, indices, sizes, self.views)
            return drawn.boxes, drawn.flips, drawn.holes, drawn.ops, drawn.magnitude_bins, drawn.signs.astype(np.int32)

        return batch_augment_pipeline(params=params, views=self.views, view_size=self.view_size, augment=self.augment,
                                      auto_ops=self.augmentation.auto_ops, **self._pipeline_args(order, seed=self.seed))

    def _stage(self, stage: str | None = None) -> str:
        """Who makes the views: ``stage`` if given, else torch on the cpu decoder and DALI on mixed."""
        if stage is None:
            return "torch" if self.decoder == "cpu" else "dali"
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

        def batches_from(position: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            pipe = self.build_pipeline(epoch, position, stage)
            if self._stage(stage) == "torch":
                return self._torch_batches(pipe, epoch, order[position * self.batch_size :])
            return self._dali_batches(pipe)

        for images, labels in self._recovering(batches_from, order, start):
            self._position = (epoch, self._position[1] + 1)
            yield images.permute(0, 1, 4, 2, 3), labels

    def _torch_batches(self, pipe, epoch: int, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """DALI decodes; torch's view stage renders each batch into its reused buffer."""
        if self._torch_views is None:
            self._torch_views = TorchViews(self.num_threads, self.batch_size, self.views, self.view_size)
        pipe.build()
        readable = self._refilled(order)
        for at in range(0, len(order), self.batch_size):
            decoded, _ = pipe.run()
            images = [np.asarray(decoded[i]) for i in range(len(decoded))]
            indices = order[at : at + self.batch_size]  # a refilled slot keeps its own sample's views
            params = self.augmentation.draw(epoch, indices, [image.shape[:2] for image in images], self.views)
            labels = torch.from_numpy(self._labels[readable[at : at + self.batch_size]].astype(np.int64))
            yield self._torch_views(images, params).to(self.device), labels.to(self.device)

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
        for position, (images, labels) in enumerate(self.epoch(0)):
            keep = _evaluated(self, order, real, position)
            if keep.any():
                yield images[keep], labels[keep]


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
    ) -> None:
        if crop < 1 or resize < crop:
            raise UsageError(f"validation needs 1 <= crop <= resize, got crop {crop}, resize {resize}")
        self.resize, self.crop = resize, crop
        super().__init__(data, batch_size, rank, world_size, decoder, device, num_threads, seed=0)

    def __len__(self) -> int:
        return len(eval_shard(len(self.dataset), self.rank, self.world_size, self.batch_size)[0]) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, real = eval_shard(len(self.dataset), self.rank, self.world_size, self.batch_size)

        def batches_from(position: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            args = self._pipeline_args(order[position * self.batch_size :], seed=0)
            return self._dali_batches(center_crop_pipeline(resize=self.resize, crop=self.crop, **args))

        for position, (images, labels) in enumerate(self._recovering(batches_from, order, 0)):
            keep = _evaluated(self, order, real, position)
            if keep.any():
                yield images[keep].permute(0, 3, 1, 2), labels[keep]


def _evaluated(loader: _ShardedLoader, order: np.ndarray, real: int, position: int) -> torch.Tensor:
    """Which samples of evaluation batch ``position`` count: not the padding that evens out the
    ranks (after the first ``real`` of ``order``), not a broken file (its slot was refilled)."""
    at = position * loader.batch_size
    indices = order[at : at + loader.batch_size]
    keep = (np.arange(at, at + len(indices)) < real) & ~loader._broken(indices)
    return torch.from_numpy(keep).to(loader.device)
