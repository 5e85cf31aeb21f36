"""A peer for the GPU: torchvision's own GPU path, the best a plain torchvision loop does there.

(g) torchvision on the device: each batch's files read in the training process, decoded together by
``torchvision.io.decode_jpeg(list, device="cuda")`` (nvJPEG), then transforms.v2 random-resized-crop
+ flip M times per sample on the GPU, stacked into (B, M, 3, S, S) uint8 like dali-ba's batch. No
DataLoader: the GPU does the work, so there is nothing to spread over worker processes (each would
need its own CUDA context). On a machine without a GPU it runs the same code on the CPU (the
smoke run of the GPU check). The views follow benchmarks/peers.py's semantics (area
(0.08, 1), aspect (3/4, 4/3), bilinear with antialiasing).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from benchmarks.peers import AREA, RATIO


class TorchvisionOnDevice:
    """(g): ``epoch(i)`` yields (B, M, 3, S, S) uint8 and (B,) int64 on ``device``, a fresh shuffle per epoch."""

    def __init__(self, dataset, batch_size: int, views: int, size: int, device: str, seed: int = 0) -> None:
        from torchvision.transforms import v2

        self.files, self.labels = dataset.files, torch.as_tensor(dataset.labels)
        self.batch_size, self.views, self.device, self.seed = batch_size, views, torch.device(device), seed
        self.transform = v2.Compose(
            [v2.RandomResizedCrop(size, scale=AREA, ratio=RATIO, antialias=True), v2.RandomHorizontalFlip()]
        )

    def epoch(self, index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        order = torch.randperm(len(self.files), generator=torch.Generator().manual_seed(self.seed + index))
        for at in range(0, len(order) - self.batch_size + 1, self.batch_size):  # the last partial batch dropped
            chosen = order[at : at + self.batch_size]
            encoded = [read_file(self.files[i]) for i in chosen.tolist()]
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            views = torch.stack([torch.stack([self.transform(image) for _ in range(self.views)]) for image in images])
            yield views, self.labels[chosen].to(self.device, non_blocking=True)
