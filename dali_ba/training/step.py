"""One training step on B*M views, and a rank's set-up for it: what ``dali_ba.train`` runs each step
and ``dali_ba.tools.profile step`` times.

The learning rate follows the unique global batch B (the baseline's regime), never B*M; the loss is
the mean cross-entropy over all B*M views, its gradient averaged over ranks by the engine's
:class:`~dali_ba.distributed.world.GradientSync`.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from dali_ba.data.dataset import ImageDataset
from dali_ba.errors import UsageError
from dali_ba.recipe import Recipe
from dali_ba.training.checks import check_memory, check_world, model_parameters

if TYPE_CHECKING:
    import torch

    from dali_ba.distributed.world import GradientSync, World
    from dali_ba.loading.loader import BatchAugmentLoader
    from dali_ba.training.metrics import StepClock


def lr_factor(step: int, steps_per_epoch: int, warmup_epochs: float, decay_epochs: list[int], decay_factor: float) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up, then step decay at the given epochs."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return (step + 1) / (warmup_epochs * steps_per_epoch)
    return decay_factor ** sum(epoch >= e for e in decay_epochs)


class StepOutput(NamedTuple):
    loss: torch.Tensor  # mean cross-entropy over the step's B*M views (this rank), no sync
    correct: torch.Tensor  # views whose top-1 prediction was right


def train_step(
    sync: GradientSync,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunks: int = 1,
    memory_format: torch.memory_format | None = None,
    autocast=contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    label_smoothing: float = 0.0,
    phase: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext(),
) -> StepOutput:
    """One optimizer step on the B*M views of a batch, gradients averaged over ranks by ``sync``.

    With ``chunks`` K > 1 the views go through the model in K micro-batches whose losses are
    weighted by their share of the batch, so the summed gradient is that of the mean over all B*M
    views, allreduced once (``sync`` built for K chunks). ``phase`` (a
    :class:`dali_ba.training.metrics.StepClock`'s) times "forward_backward" and "allreduce_step".
    """
    import torch
    import torch.nn.functional as F

    from dali_ba.loading.tensors import flatten_views, normalize

    with phase("forward_backward"):
        x, y = flatten_views(images, labels)
        x = normalize(x).contiguous(memory_format=memory_format or torch.channels_last)
        sync.optimizer.zero_grad()  # Horovod 0.28 takes no set_to_none; torch 2 sets grads to None anyway
        total = torch.zeros((), device=x.device)
        correct = torch.zeros((), device=x.device, dtype=torch.int64)
        for index, (xc, yc) in enumerate(zip(x.tensor_split(chunks), y.tensor_split(chunks))):
            with sync.micro_batch(last=index == chunks - 1):
                with autocast():
                    logits = sync.model(xc)
                    loss = F.cross_entropy(logits, yc, label_smoothing=label_smoothing) * (len(yc) / len(y))
                (scaler.scale(loss) if scaler else loss).backward()
            total += loss.detach()
            correct += (logits.detach().argmax(1) == yc).sum()
    with phase("allreduce_step"):  # Horovod waits here for the allreduces the backward pass started
        sync.step(scaler)
    return StepOutput(total, correct)


def gradient_norm(model: torch.nn.Module) -> torch.Tensor | float:
    """L2 norm of all parameter gradients (after the step they hold the allreduced average), as a 0-d
    tensor left on the device (read with the step's loss, never in the step):
    ``torch.nn.utils.get_total_norm`` where torch has it (2.6 on), the same norm of norms before."""
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if total_norm is not None:
        return total_norm(grads, norm_type=2.0).detach()
    vector_norm = torch.linalg.vector_norm
    return vector_norm(torch.stack([vector_norm(g.detach(), 2.0) for g in grads]), 2.0)


CUBLAS_WORKSPACE = ":4096:8"  # CUBLAS_WORKSPACE_CONFIG for deterministic cuBLAS (CUDA >= 10.2; ":16:8" also works)


def apply_determinism(deterministic: bool, device: torch.device | str) -> dict[str, object]:
    """torch's kernel switches for a run, set before any CUDA work; returns what was set.

    ``deterministic``: cuDNN's benchmark off and its deterministic algorithms on,
    ``torch.use_deterministic_algorithms(True)`` (an op with no deterministic kernel then raises), and
    ``CUBLAS_WORKSPACE_CONFIG`` (``:4096:8``, unless the environment sets it) that cuBLAS reads when
    its first handle is made. Otherwise the fast ones: all off, but ``cudnn.benchmark`` on a GPU
    (the views are of one size: cuDNN picks its kernels once)."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.benchmark = cuda and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)
    applied: dict[str, object] = {"cudnn_benchmark": torch.backends.cudnn.benchmark,
                                  "cudnn_deterministic": deterministic, "deterministic_algorithms": deterministic}
    if deterministic:
        applied["CUBLAS_WORKSPACE_CONFIG"] = os.environ["CUBLAS_WORKSPACE_CONFIG"]
    return applied


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
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None
    peak_lr: float

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.sync.optimizer

    def step(self, images: torch.Tensor, labels: torch.Tensor, clock: StepClock | None = None) -> StepOutput:
        """One optimizer step on a batch already on ``device``, its phases timed on ``clock``."""
        o = self.recipe.optim
        out = train_step(self.sync, images, labels, chunks=o.chunks, memory_format=self.memory_format,
                         autocast=self.autocast, scaler=self.scaler, label_smoothing=o.label_smoothing,
                         **({"phase": clock.phase} if clock else {}))
        if clock:  # DDP waits for its allreduces inside backward: that wait belongs to allreduce_step
            clock.move("forward_backward", "allreduce_step", self.sync.backward_wait())
        return out


def setup_training(recipe: Recipe, world: World, train_set: ImageDataset) -> Training:
    """Device, threads, the training loader, the model and the engine's gradient averaging (weights
    not yet broadcast), AMP. The loader's tensors stay where DALI made them (CPU for the cpu decoder):
    moving them is the caller's, so that it can be timed."""
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
        train_set, per_rank, d.views, d.view_size, **d.augmentation(),
        rank=world.rank, world_size=world.size, seed=r.seed, decoder=d.decoder, num_threads=d.dali_threads,
        hw_decoder_load=d.hw_decoder_load,
    )
    memory_format = torch.channels_last if m.channels_last else torch.contiguous_format
    model = create_model(m.arch, train_set.num_classes, m.dropout).to(device, memory_format=memory_format)
    if m.arch not in PAPER_CIFAR:  # built elsewhere, perhaps for one input size (a ViT): try one view first
        check_input_size(model, m.arch, d.view_size, device)
    peak_lr = o.lr * d.batch_size / o.lr_batch  # unique images per step, never B*M
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=o.momentum, weight_decay=o.weight_decay)
    sync = world.gradient_sync(model, optimizer, o.chunks)
    if m.compile:  # the training forward only (DDP's wrapper for the torch engine, torch's recommended
        # order); ``model`` stays the bare module: checkpoints, evaluation and digests see its unprefixed keys
        sync.model = torch.compile(sync.model)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(m.amp)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda") if m.amp == "fp16" else None
    return Training(recipe, device, per_rank, torch_threads, loader, model, sync, memory_format, autocast,
                    scaler, peak_lr)
