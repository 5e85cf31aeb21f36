"""A rank's training set-up (:func:`setup_training`): device, threads, the training loader, the model,
the engine's gradient averaging and AMP, as :class:`Training`. What ``dali_ba.train`` and
``dali_ba.tools.profile step`` both run, so that the profiler times the steps training takes; the
step itself is :mod:`dali_ba.training.step`.

The learning rate follows the unique global batch B (the baseline's regime), never B*M.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dali_ba.data.dataset import ImageDataset
from dali_ba.errors import UsageError
from dali_ba.recipe import Recipe
from dali_ba.training.checks import check_memory, check_world, model_parameters
from dali_ba.training.determinism import apply_determinism
from dali_ba.training.step import StepOutput, train_step

if TYPE_CHECKING:
    import torch

    from dali_ba.distributed.world import GradientSync, World
    from dali_ba.loading.loader import BatchAugmentLoader
    from dali_ba.training.startup import StartupClock
    from dali_ba.training.step_clock import StepClock


@dataclass
class Training:
    """A rank's training set-up: what ``dali_ba.train`` and ``dali_ba.tools.profile step`` both run."""

    recipe: Recipe
    device: torch.device
    per_rank: int
    torch_threads: int
    loader: BatchAugmentLoader
    model: torch.nn.Module  # the bare model: what checkpoints, evaluation and digests see
    sync: GradientSync  # the gradient averaging around it
    memory_format: torch.memory_format
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    scaler: torch.amp.GradScaler | None
    peak_lr: float

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.sync.optimizer

    def step(self, images: torch.Tensor, labels: torch.Tensor, clock: StepClock | None = None) -> StepOutput:
        """One optimizer step on a batch already on ``device``, its phases timed on ``clock``."""
        o = self.recipe.optim
        out = train_step(
            self.sync,
            images,
            labels,
            chunks=o.chunks,
            memory_format=self.memory_format,
            autocast=self.autocast,
            scaler=self.scaler,
            label_smoothing=o.label_smoothing,
            **({"phase": clock.phase} if clock else {}),
        )
        if clock:  # DDP waits for its allreduces inside backward: that wait belongs to allreduce_step
            clock.move("forward_backward", "allreduce_step", self.sync.backward_wait())
        return out


def setup_training(
    recipe: Recipe, world: World, train_set: ImageDataset, startup: StartupClock | None = None
) -> Training:
    """Device, threads, the training loader, the model and the engine's gradient averaging (weights
    not yet broadcast), AMP. The loader's tensors stay where DALI made them (CPU for the cpu decoder):
    moving them is the caller's, so that it can be timed. ``startup``: the run's start-up clock, on
    which the model's build (to the engine's wrapper and torch.compile's) is timed as ``model``."""
    import torch

    from dali_ba.distributed.placement import training_device
    from dali_ba.distributed.world import check_gpu_sharing
    from dali_ba.loading.loader import BatchAugmentLoader
    from dali_ba.training.models import PAPER_CIFAR, check_input_size, create_model

    d, m, o, r = recipe.data, recipe.model, recipe.optim, recipe.run
    per_rank = check_world(recipe, world, train_set)
    device = training_device(world.local_rank)  # local rank -> a GPU this process sees (or the CPU)
    apply_determinism(r.deterministic, device)  # cudnn.benchmark unless --deterministic; before CUDA work
    if device.type == "cuda":
        torch.cuda.set_device(device)
    check_gpu_sharing(world, device, r.share_gpu)  # collective; before DDP's first NCCL call
    if device.type == "cuda":
        check_memory(per_rank, d.views, d.view_size, world.local_size, device, model_parameters(recipe, train_set))
    if m.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a GPU; use --amp bf16 on CPU")
    cores = len(os.sched_getaffinity(0))
    torch_threads = r.torch_threads or max(1, cores // world.local_size)
    torch.set_num_threads(torch_threads)
    torch.manual_seed(r.seed)
    loader = BatchAugmentLoader(
        train_set,
        per_rank,
        d.views,
        d.view_size,
        **d.augmentation(),
        rank=world.rank,
        world_size=world.size,
        seed=r.seed,
        decoder=d.decoder,
        num_threads=d.dali_threads,
        hw_decoder_load=d.hw_decoder_load,
    )
    memory_format = torch.channels_last if m.channels_last else torch.contiguous_format
    with startup.phase("model") if startup else contextlib.nullcontext():
        model = create_model(m.arch, train_set.num_classes, m.dropout).to(device, memory_format=memory_format)  # type: ignore[call-overload]  # torch's stub splits what Module.to takes together
        if m.arch not in PAPER_CIFAR:  # built elsewhere, perhaps for one input size (a ViT): try each size first
            check_input_size(model, m.arch, [(d.view_size, "--view-size"), (d.val_crop, "--val-crop")], device)
        peak_lr = o.lr * d.batch_size / o.lr_batch  # unique images per step, never B*M
        optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=o.momentum, weight_decay=o.weight_decay)
        sync = world.gradient_sync(model, optimizer, o.chunks)
        if m.compile:  # the training forward only (DDP's wrapper for the torch engine, torch's recommended
            # order); ``model`` stays the bare module: checkpoints, evaluation and digests see its unprefixed keys
            sync.model = torch.compile(sync.model)  # type: ignore[assignment]  # an OptimizedModule, a Module; the stub says a callable
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(m.amp)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda") if m.amp == "fp16" else None
    return Training(
        recipe, device, per_rank, torch_threads, loader, model, sync, memory_format, autocast, scaler, peak_lr
    )
