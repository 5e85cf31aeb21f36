"""What a training or evaluation step does to a yielded batch before the model sees it: the M views
flattened into the batch (:func:`flatten_views`) and uint8 pixels normalized to float
(:func:`normalize`, ImageNet's mean and std by default).

Torch only, no DALI: the loaders (:mod:`dali_ba.loading.loader`) hand these batches over, and the
training step and evaluation (:mod:`dali_ba.training`) call these on them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def flatten_views(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M, 3, H, W) + (B,) -> (B*M, 3, H, W) + (B*M,): the M copies of a sample stay adjacent."""
    views = images.shape[1]
    return images.flatten(0, 1), labels.repeat_interleave(views)


def normalize(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 channels_last, (x/255 - mean)/std, on the tensor's own device."""
    x = images.to(memory_format=torch.channels_last).float()
    shift, scale = _normalization(x.device, tuple(mean), tuple(std))
    return x.sub_(shift).div_(scale)


@functools.lru_cache(maxsize=16)
def _normalization(
    device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) of :func:`normalize` on ``device``, made once: a copy to the GPU per step is a sync."""
    return (
        torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
        torch.tensor(std, device=device).view(1, 3, 1, 1) * 255,
    )
