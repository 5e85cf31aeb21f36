"""One training step on B*M views: what ``dali_ba.train`` runs each step and ``dali_ba.tools.profile
step`` times (a rank's set-up for it: :mod:`dali_ba.training.rank_setup`).

The loss is the mean cross-entropy over all B*M views, its gradient averaged over ranks by the
engine's :class:`~dali_ba.distributed.world.GradientSync`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

    from dali_ba.distributed.world import GradientSync


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
    :class:`dali_ba.training.step_clock.StepClock`'s) times "forward_backward" and "allreduce_step".
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
