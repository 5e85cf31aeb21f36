"""Determinism: torch's kernel switches for a run (``--deterministic`` or the fast ones), set on each
rank before any CUDA work by its set-up (:mod:`dali_ba.training.rank_setup`); kept apart from it as
the one place that says what ``--deterministic`` switches.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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
    applied: dict[str, object] = {
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": deterministic,
        "deterministic_algorithms": deterministic,
    }
    if deterministic:
        applied["CUBLAS_WORKSPACE_CONFIG"] = os.environ["CUBLAS_WORKSPACE_CONFIG"]
    return applied
