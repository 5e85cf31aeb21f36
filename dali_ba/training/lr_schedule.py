"""The learning-rate schedule: a linear warm-up, then step decay at given epochs, as a factor of the
peak LR (what the trainer's ``LambdaLR`` multiplies). The peak LR follows the unique global batch B,
never B*M (:mod:`dali_ba.training.rank_setup`).
"""

from __future__ import annotations


def lr_factor(
    step: int, steps_per_epoch: int, warmup_epochs: float, decay_epochs: list[int], decay_factor: float
) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up, then step decay at the given epochs."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return (step + 1) / (warmup_epochs * steps_per_epoch)
    return decay_factor ** sum(epoch >= e for e in decay_epochs)
