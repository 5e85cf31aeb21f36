"""The CPU view stage: torch's vectorised uint8 kernels make the M views of each decoded sample.

DALI reads and decodes (once per sample); a pool of threads then renders each sample's views from
their :class:`~dali_ba.augment.ViewParams` (``torchvision.transforms.v2.functional`` crop with zero
padding and mirror; torch's bilinear antialiased uint8 resize, the kernel v2's ``resize`` calls)
straight into one preallocated (B, M, H, W, 3) uint8 batch. Each pool thread runs torch
single-threaded: the parallelism is the pool's, a few tasks of interleaved samples per thread, and
the process's own torch thread count is left alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from dali_ba.augment import ViewParams

TASKS_PER_THREAD = 4


def render_views(image: torch.Tensor, boxes: np.ndarray, flips: np.ndarray, holes: np.ndarray, out: torch.Tensor) -> None:
    """Write the views of one (H, W, 3) uint8 image into ``out`` (M, S, S, 3), one per row of ``boxes``."""
    chw = image.permute(2, 0, 1)  # a (3, H, W) view of HWC memory
    size = list(out.shape[1:3])
    for (top, left, height, width), flip, (y0, x0, y1, x1), target in zip(boxes.tolist(), flips, holes.tolist(), out):
        view = F.crop(chw, top, left, height, width)  # zero padding where the box leaves the image
        if [height, width] != size:
            # From dense channels-last memory torch's uint8 resize runs about twice as fast, output
            # included (measured: one copy of the crop costs less than the strided read it saves).
            # Called directly: v2's resize calls the same kernel, its dispatch costs ~12 us a view.
            dense = view[None].contiguous(memory_format=torch.channels_last)
            view = torch.nn.functional.interpolate(dense, size=size, mode="bilinear", antialias=True)[0]
        target.permute(2, 0, 1).copy_(F.horizontal_flip(view) if flip else view)
        if y1 > y0 and x1 > x0:
            target[y0:y1, x0:x1] = 0


class TorchViews:
    """Renders batches of views in ``threads`` threads into one reused (B, M, S, S, 3) uint8 buffer."""

    def __init__(self, threads: int, batch_size: int, views: int, view_size: int) -> None:
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="dali-ba-views", initializer=torch.set_num_threads,
                                       initargs=(1,))  # per thread: the process's torch threads are untouched
        self.out = torch.empty((batch_size, views, view_size, view_size, 3), dtype=torch.uint8)

    def __call__(self, images: Sequence[np.ndarray], params: ViewParams) -> torch.Tensor:
        """The views of ``images`` (HWC uint8 arrays, one per sample); valid until the next call."""

        def render(samples: range) -> None:
            for b in samples:
                render_views(torch.from_numpy(images[b]), params.boxes[b], params.flips[b], params.holes[b], self.out[b])

        # A few tasks per thread: balanced enough, and less dispatch than one task per sample.
        tasks = min(len(images), TASKS_PER_THREAD * self.threads)
        for job in [self.pool.submit(render, range(t, len(images), tasks)) for t in range(tasks)]:
            job.result()
        return self.out
