"""Evaluation: top-1/top-5 over the validation set (as trained, or by the softmax averaged over K
augmented views), and BatchNorm statistics recomputed from training views before evaluating.

Counts are summed over ranks, never averaged, so the numbers are exact for any world size.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dali_ba.errors import UsageError

if TYPE_CHECKING:
    import torch

    from dali_ba.data.dataset import ImageDataset
    from dali_ba.distributed.world import World
    from dali_ba.loading.loader import AugmentedValidationLoader, BatchAugmentLoader, ValidationLoader
    from dali_ba.recipe import Recipe
    from dali_ba.training.rank_setup import Training


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    world: World,
    memory_format: torch.memory_format | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, float]:
    """Loss, top-1 and top-5 (top-k for k < 5 classes) over ``batches`` of every rank, exactly:
    correct counts and sample counts are summed over ranks, not averaged.

    Batches of (b, 3, H, W) images are classified as they are; batches of (b, K, 3, H, W) (K views of
    each sample) by the softmax averaged over the K views (the authors' ``--avg-out``), the loss then
    being the negative log of that average at the label."""
    import torch
    import torch.nn.functional as F

    from dali_ba.loading.tensors import normalize

    memory_format = memory_format or torch.channels_last
    was_training = model.training
    model.eval()
    sums, count = None, 0  # loss sum, top-1 hits, top-5 hits on the device until the end (no sync per batch)
    with torch.no_grad():
        for images, labels in batches:
            views = images.shape[1] if images.dim() == 5 else 0
            x = images.flatten(0, 1) if views else images
            with autocast():
                logits = model(normalize(x).contiguous(memory_format=memory_format)).float()
            if views:  # log of the mean softmax over the views: a log-probability per class
                scores = logits.log_softmax(1).unflatten(0, (len(labels), views)).logsumexp(1) - math.log(views)
                loss = F.nll_loss(scores, labels, reduction="sum")
            else:
                scores = logits
                loss = F.cross_entropy(logits, labels, reduction="sum")
            hits = scores.topk(min(5, scores.shape[1]), dim=1).indices == labels[:, None]
            batch = torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(1).sum().double()])
            sums, count = batch if sums is None else sums + batch, count + len(labels)
    model.train(was_training)
    local = sums.cpu().tolist() if sums is not None else [0.0] * 3  # the one wait for the device
    loss, top1, top5, count = world.sum([*local, count])
    return {"val_loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "val_samples": int(count)}


def calibrate_batchnorm(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    world: World,
    memory_format: torch.memory_format | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> int:
    """Recompute BatchNorm running statistics from ``batches`` of training views (the authors'
    ``--calibrate-bn``): reset, then the plain average over all batches (momentum None), averaged
    over ranks. Returns the number of batches seen on this rank.

    The average is torch's ``momentum=None`` one, with the factor 1/k of the k-th batch given from
    the host: torch would read ``num_batches_tracked`` off the device in every BatchNorm layer."""
    import torch

    from dali_ba.loading.tensors import flatten_views, normalize

    memory_format = memory_format or torch.channels_last
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
    was_training = model.training
    model.train()
    seen = 0
    with torch.no_grad():
        for images, labels in batches:
            for m in norms:
                m.momentum = 1.0 / (seen + 1)  # cumulative average over the calibration batches
            x, _ = flatten_views(images, labels)
            with autocast():
                model(normalize(x).contiguous(memory_format=memory_format))
            seen += 1
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    world.average_buffers(model)
    return seen


@dataclass
class Validation:
    """A run's evaluation after each epoch: as trained over ``plain``; with --eval-views K, also by the
    softmax averaged over K augmented views (``views``); with --calibrate-bn N, also after recomputing
    BatchNorm statistics from N batches of ``calibration`` (for that evaluation only: training goes
    on unchanged)."""

    training: Training
    world: World
    plain: ValidationLoader
    views: AugmentedValidationLoader | None
    calibration: BatchAugmentLoader | None
    calibration_batches: int

    @classmethod
    def build(
        cls, recipe: Recipe, world: World, training: Training, train_set: ImageDataset, val_set: ImageDataset
    ) -> Validation:
        """The loaders of the run's evaluation, on ``training``'s device and per-rank batch."""
        import torch

        from dali_ba.loading.loader import AugmentedValidationLoader, BatchAugmentLoader, ValidationLoader

        d, r, t = recipe.data, recipe.run, training
        if d.calibrate_bn and not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in t.model.modules()):
            raise UsageError(
                f"--calibrate-bn {d.calibrate_bn}: --arch {recipe.model.arch} has no BatchNorm layer "
                "whose statistics could be recomputed; leave --calibrate-bn out"
            )
        plain = ValidationLoader(
            val_set,
            d.val_batch_size or t.per_rank,
            d.val_resize,
            d.val_crop,
            rank=world.rank,
            world_size=world.size,
            decoder=d.decoder,
            device=t.device,
            num_threads=d.dali_threads,
            hw_decoder_load=d.hw_decoder_load,
        )
        views = (
            AugmentedValidationLoader(  # --eval-views K: the training augmentation, K views per image
                val_set,
                d.val_batch_size or t.per_rank,
                d.eval_views,
                d.view_size,
                **d.augmentation(),
                rank=world.rank,
                world_size=world.size,
                seed=r.seed,
                decoder=d.decoder,
                device=t.device,
                num_threads=d.dali_threads,
                hw_decoder_load=d.hw_decoder_load,
            )
            if d.eval_views
            else None
        )
        calibration = (
            BatchAugmentLoader(  # --calibrate-bn N: training batches of their own (seed + 1)
                train_set,
                t.per_rank,
                d.views,
                d.view_size,
                **d.augmentation(),
                rank=world.rank,
                world_size=world.size,
                seed=r.seed + 1,
                decoder=d.decoder,
                num_threads=d.dali_threads,
                hw_decoder_load=d.hw_decoder_load,
            )
            if d.calibrate_bn
            else None
        )
        return cls(training, world, plain, views, calibration, d.calibrate_bn)

    @property
    def loaders(self) -> list[ValidationLoader | AugmentedValidationLoader | BatchAugmentLoader]:
        """The loaders this evaluation reads (those its options call for)."""
        return [each for each in (self.plain, self.views, self.calibration) if each]

    def run(self, epoch: int) -> dict[str, float]:
        """Collective: the evaluation after ``epoch`` (``calibrated_*`` from that epoch's calibration batches)."""
        from dali_ba.device import to_device

        t, world = self.training, self.world
        model, device = t.model, t.device
        result = evaluate(model, self.plain, world, t.memory_format, t.autocast)
        if self.views:
            views = evaluate(model, self.views, world, t.memory_format, t.autocast)
            result.update({f"views_{k}": v for k, v in views.items() if k != "val_samples"})
        if self.calibration:
            kept = {k: v.clone() for k, v in model.named_buffers()}
            batches = itertools.islice(
                self.calibration.epoch(epoch), min(self.calibration_batches, len(self.calibration))
            )
            calibrate_batchnorm(
                model,
                ((to_device(x, device), to_device(y, device)) for x, y in batches),
                world,
                t.memory_format,
                t.autocast,
            )
            calibrated = evaluate(model, self.plain, world, t.memory_format, t.autocast)
            result.update({f"calibrated_{k}": v for k, v in calibrated.items() if k != "val_samples"})
            model.load_state_dict(kept, strict=False)
        return result
