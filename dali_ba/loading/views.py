"""The CPU view stage: torch's vectorised uint8 kernels make the M views of each decoded sample.

DALI reads and decodes (once per sample); a pool of threads then renders each sample's views from
their :class:`~dali_ba.loading.augment.ViewParams` (``torchvision.transforms.v2.functional`` crop with zero
padding and mirror; torch's bilinear antialiased uint8 resize, the kernel v2's ``resize`` calls)
straight into one preallocated (B, M, H, W, 3) uint8 batch; the auto-augment ops of ``trivial`` and
``randaugment`` follow with v2's functional ops (:data:`AUTO_OP_RENDERERS`). Each pool thread runs torch
single-threaded: the parallelism is the pool's, a few tasks of interleaved samples per thread, and
the process's own torch thread count is left alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from dali_ba.loading.augment import AutoOp, ViewParams

TASKS_PER_THREAD = 4
FILL = [128.0]  # DALI's fill for the pixels a warp brings in from outside the view


def _affine(
    view: torch.Tensor, translate: tuple[float, float] = (0.0, 0.0), shear: tuple[float, float] = (0.0, 0.0)
) -> torch.Tensor:
    """DALI's ``warp_affine`` of a translation (pixels) or shear (x += s y, y += s x) about the top-left corner."""
    # v2's shear angles: x' = x - tan(a) y, y' = y - tan(b) x (for one of them non-zero).
    angles = [-math.degrees(math.atan(s)) for s in shear]
    return cast(
        torch.Tensor,
        F.affine(
            view,
            angle=0.0,
            translate=list(translate),
            scale=1.0,
            shear=angles,
            center=[0, 0],
            interpolation=F.InterpolationMode.BILINEAR,
            fill=FILL,
        ),
    )


def _equalize(view: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalisation by OpenCV's formula, which DALI's equalize follows (v2's
    follows PIL's, ~9 levels off on average): lut[v] = round(255 (cdf[v] - cdf[lo]) / (N - cdf[lo])),
    lo the darkest level present; a one-level channel stays as it is."""
    flat = view.reshape(3, -1).long()
    cdf = (
        torch.zeros(3, 256, dtype=torch.float64)
        .scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
        .cumsum_(1)
    )
    low = cdf.gather(1, flat.min(dim=1, keepdim=True).values)  # cdf at the darkest level present
    spread = (cdf[:, -1:] - low).clamp_(min=1)
    lut = ((cdf - low) * 255 / spread).round_().clamp_(0, 255).to(torch.uint8)
    single = (cdf[:, -1:] == low).squeeze(1)
    out = lut.gather(1, flat).reshape(view.shape)
    out[single] = view[single]
    return out


# The ops of augment.AUTO_OPS, each from its signed magnitude, mapped to a parameter as DALI's
# nvidia.dali.auto_aug.augmentations does (mag_to_param): the same image for the same draws up to
# rounding (DALI rounds uint8 results to nearest, v2 truncates some), the warps' outermost pixels and
# the sharpness filter's 1 px border (v2 keeps the input there, DALI filters it).
AUTO_OP_RENDERERS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "translate_x": lambda view, mag: _affine(view, translate=(mag, 0.0)),
    "translate_y": lambda view, mag: _affine(view, translate=(0.0, mag)),
    "shear_x": lambda view, mag: _affine(view, shear=(mag, 0.0)),
    "shear_y": lambda view, mag: _affine(view, shear=(0.0, mag)),
    "rotate": lambda view, mag: F.rotate(view, mag, interpolation=F.InterpolationMode.BILINEAR, fill=FILL),
    "brightness": lambda view, mag: F.adjust_brightness(view, 1 + mag),
    "contrast": lambda view, mag: F.adjust_contrast(view, 1 + mag),
    "color": lambda view, mag: F.adjust_saturation(view, 1 + mag),
    "sharpness": lambda view, mag: F.adjust_sharpness(view, 1 + mag),
    "posterize": lambda view, mag: F.posterize(view, min(max(round(mag), 1), 8)),
    "solarize": lambda view, mag: F.solarize(view, mag) if mag <= 255 else view,  # 256: nothing reaches it
    "equalize": lambda view, mag: _equalize(view),
    "auto_contrast": lambda view, mag: F.autocontrast(view),
    "identity": lambda view, mag: view,
}


def auto_augmented(
    view: torch.Tensor, suite: Sequence[AutoOp], ops: np.ndarray, magnitudes: np.ndarray
) -> torch.Tensor:
    """A (3, S, S) uint8 view after the ops ``ops`` (indices into ``suite``) at ``magnitudes``, in order."""
    for op, magnitude in zip(ops.tolist(), magnitudes.tolist()):
        view = AUTO_OP_RENDERERS[suite[op].name](view, magnitude)
    return view


def render_views(image: torch.Tensor, params: ViewParams, b: int, out: torch.Tensor) -> None:
    """Write the views of one (H, W, 3) uint8 image, sample ``b`` of ``params``, into ``out`` (M, S, S, 3)."""
    chw = image.permute(2, 0, 1)  # a (3, H, W) view of HWC memory
    size = list(out.shape[1:3])
    views = zip(
        params.boxes[b].tolist(), params.flips[b], params.holes[b].tolist(), out, params.ops[b], params.magnitudes[b]
    )
    for (top, left, height, width), flip, (y0, x0, y1, x1), target, ops, magnitudes in views:
        view = F.crop(chw, top, left, height, width)  # zero padding where the box leaves the image
        if [height, width] != size:
            # From dense channels-last memory torch's uint8 resize runs about twice as fast, output
            # included (measured: one copy of the crop costs less than the strided read it saves).
            # Called directly: v2's resize calls the same kernel, its dispatch costs ~12 us a view.
            dense = view[None].contiguous(memory_format=torch.channels_last)
            # A box that is its whole decoded region is dense already, but [None] gave it a batch
            # stride of 3, from which interpolate writes contiguous NCHW, ~1.5x slower: the stride a
            # copy would have.
            dense = dense.as_strided(dense.shape, (dense.numel(), *dense.stride()[1:]))
            view = torch.nn.functional.interpolate(dense, size=size, mode="bilinear", antialias=True)[0]
        view = F.horizontal_flip(view) if flip else view
        if len(ops):
            view = auto_augmented(view, params.suite, ops, magnitudes)
        target.permute(2, 0, 1).copy_(view)
        if y1 > y0 and x1 > x0:
            target[y0:y1, x0:x1] = 0


class TorchViews:
    """Renders batches of views in ``threads`` threads into one reused (B, M, S, S, 3) uint8 buffer."""

    def __init__(self, threads: int, batch_size: int, views: int, view_size: int) -> None:
        self.threads = threads
        self.pool = ThreadPoolExecutor(
            threads, thread_name_prefix="dali-ba-views", initializer=torch.set_num_threads, initargs=(1,)
        )  # per thread: the process's torch threads are untouched
        self.out = torch.empty((batch_size, views, view_size, view_size, 3), dtype=torch.uint8)

    def __call__(self, images: Sequence[np.ndarray], params: ViewParams) -> torch.Tensor:
        """The views of ``images`` (HWC uint8 arrays, one per sample); valid until the next call."""

        def render(samples: range) -> None:
            for b in samples:
                render_views(torch.from_numpy(images[b]), params, b, self.out[b])

        # A few tasks per thread: balanced enough, and less dispatch than one task per sample.
        tasks = min(len(images), TASKS_PER_THREAD * self.threads)
        for job in [self.pool.submit(render, range(t, len(images), tasks)) for t in range(tasks)]:
            job.result()
        return self.out
