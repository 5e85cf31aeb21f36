"""dali-ba: Batch Augmentation (Hoffer et al.) with NVIDIA DALI, PyTorch and Horovod.

Each of B samples per step is read and decoded once and trained on as M augmented views.
"""

from typing import Any

from dali_ba.errors import UsageError
from dali_ba.version import __version__

__all__ = [
    "BatchAugmentLoader",
    "ValidationLoader",
    "AugmentedValidationLoader",
    "flatten_views",
    "normalize",
    "UsageError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # The loader pulls in torch and DALI; import it only when asked, so the CLI can reject bad
    # input before paying for those imports.
    if name in ("BatchAugmentLoader", "ValidationLoader", "AugmentedValidationLoader"):
        from dali_ba.loading import loader

        return getattr(loader, name)
    if name in ("flatten_views", "normalize"):
        from dali_ba.loading import tensors

        return getattr(tensors, name)
    raise AttributeError(f"module 'dali_ba' has no attribute {name!r}")
