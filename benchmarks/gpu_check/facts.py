"""Two facts only a GPU can tell, measured by the GPU check's loader step, each its own target row in
the report (benchmarks/gpu_check/report.py):

- ``batch_lifetime``: whether a batch of dali-ba's GPU path stays intact while the loader makes the
  next two. DALI's torch iterator hands DALI's own memory to torch through DLPack (no copy): the loader
  promises a batch until the next one only, but a training step's kernels may still be queued on
  torch's stream, reading it, when the loop asks for the next batch. Measured twice: a batch the
  consumer keeps, and a batch the consumer lets go while a copy of it waits on the stream.
- ``decoder_difference``: the mixed decoder's largest pixel difference from the cpu decoder on the
  same files, decoded whole and as dali-ba's views (the same view parameters), against
  ``MIXED_DECODE_TOLERANCE``, which the tests only assert.

The loader step runs them in a process of their own under a limit (a hang costs that, no other
result): ``python -m benchmarks.gpu_check.facts --data DIR --out FILE [--smoke]``, ``FILE`` rewritten
as each fact ends. On the CPU neither is measured (:func:`measure_fact` says why; no CPU number stands
in for a GPU's); their parts run on the CPU in tests/test_gpu_check_parts.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.gpu_check.context import FULL, SMOKE, Sizes, gpu
from benchmarks.gpu_check.report import write_atomic

if TYPE_CHECKING:
    import numpy as np
    import torch

    from dali_ba.data.dataset import ImageDataset
    from dali_ba.loading.loader import BatchAugmentLoader

FACT_VIEWS = 4  # M of the facts' loaders
QUEUED_SECONDS = 0.5  # GPU work queued ahead of the late copy: longer than the loader takes for two batches


def measure_fact(name: str, dataset: ImageDataset, s: Sizes) -> dict:
    """The fact ``name`` of :data:`FACTS`, measured on the GPU; on the CPU, why it was not."""
    fact, why = FACTS[name]
    if not gpu():
        return dict(views=FACT_VIEWS, skipped=why)
    return fact(dataset, s)


# --- a batch's lifetime -----------------------------------------------------------------------------------


def batch_lifetime(dataset: ImageDataset, s: Sizes, decoder: str = "mixed") -> dict:
    """dali-ba's batches on ``decoder`` with DALI making the views (the GPU path's stage): one kept
    (:func:`kept_batch`, epoch 0), one let go while read late (:func:`late_read`, epoch 1)."""
    loader = fact_loader(dataset, s, decoder)
    if len(loader) < 3:
        raise ValueError(f"an epoch of {len(loader)} batches: the check needs 3")
    cuda = loader.device.type == "cuda"
    return dict(
        decoder=loader.decoder,
        device=str(loader.device),
        batch=loader.batch_size,
        views=loader.views,
        kept=kept_batch(loader.epoch(0), cuda),
        late=late_read(loader.epoch(1), cuda, QUEUED_SECONDS),
    )


def kept_batch(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], cuda: bool) -> dict:
    """A batch the consumer keeps, cloned at once, against that clone after the loader made two more
    batches (beyond the loader's promise: what DALI's memory does with a reference still held); and
    whether a later batch came in its memory."""
    images, _ = next(batches)
    clone = images.clone()
    synchronize(cuda)  # the clone is of the batch as it came
    later = [next(batches)[0].data_ptr() for _ in range(2)]
    synchronize(cuda)  # every stream, DALI's too: the batches asked for meanwhile are made
    return dict(pixel_difference([host(images)], [host(clone)]), memory_reused=images.data_ptr() in later)


def late_read(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], cuda: bool, seconds: float) -> dict:
    """A batch read by a copy queued on torch's stream behind ``seconds`` of GPU work, the consumer's
    reference dropped at once (as a training loop drops a batch whose step's kernels still wait on the
    stream), against a copy made at once, after the loader made two more batches. ``queued`` says
    whether the late copy still waited when those were made (None on the CPU: nothing is queued)."""
    images, _ = next(batches)
    reference = images.clone()
    synchronize(cuda)
    queued_s = queue_gpu_work(seconds) if cuda else 0.0
    late = images.clone()
    done = record_event(cuda)
    del images  # the generators' own references go as they move on
    for _ in range(2):
        next(batches)
    time.sleep(seconds / 2 if cuda else 0.0)  # DALI's batches asked for meanwhile are made while the copy waits
    queued = None if done is None else not done.query()
    synchronize(cuda)
    return dict(pixel_difference([host(late)], [host(reference)]), queued_s=queued_s, queued=queued)


def queue_gpu_work(seconds: float) -> float:
    """About ``seconds`` of GPU work on torch's current stream (a spinning kernel: the device's clock
    rate times ``seconds`` cycles, at least that long); the seconds asked, or 0 where torch has none."""
    import torch

    if not hasattr(torch.cuda, "_sleep"):
        return 0.0
    khz = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "clock_rate", 2_000_000)
    torch.cuda._sleep(int(seconds * khz * 1e3))
    return seconds


def record_event(cuda: bool):
    """A CUDA event recorded on torch's current stream (it completes when the stream reaches it), or None."""
    if not cuda:
        return None
    import torch

    event = torch.cuda.Event()
    event.record()
    return event


def synchronize(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def host(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


# --- the mixed decoder against the cpu decoder ----------------------------------------------------------


def decoder_difference(dataset: ImageDataset, s: Sizes, decoders: tuple[str, str] = ("mixed", "cpu")) -> dict:
    """The first batch of epoch 0 (B files) on the two ``decoders``: decoded whole by dali-ba's decode
    graph, and as dali-ba's views made by DALI (the same boxes and flips: the same seed), compared pixel
    by pixel; the mixed decoder at dali-ba's ``hw_decoder_load``."""
    loaders = [fact_loader(dataset, s, decoder) for decoder in decoders]
    order = loaders[0].shard(0)[: s.batch]
    whole = [decoded(loader, order) for loader in loaders]
    views = [[host(next(loader.epoch(0))[0])] for loader in loaders]
    return dict(
        decoders=[loader.decoder for loader in loaders],
        hw_decoder_load=loaders[0].hw_decoder_load,
        batch=s.batch,
        views=FACT_VIEWS,
        view_size=s.view_size,
        whole=pixel_difference(*whole),
        as_views=pixel_difference(*views),
    )


def decoded(loader: BatchAugmentLoader, order: np.ndarray) -> list[np.ndarray]:
    """The first batch of ``order`` decoded whole by dali-ba's decode graph on the loader's decoder, as
    host arrays (H, W, 3)."""
    import numpy as np

    from dali_ba.loading.pipeline import decode_pipeline

    pipe = decode_pipeline(hw_decoder_load=loader.hw_decoder_load, **loader._pipeline_args(order, seed=0))
    pipe.build()
    images, _ = pipe.run()
    if hasattr(images, "as_cpu"):  # the mixed decoder's: on the GPU
        images = images.as_cpu()
    return [np.array(images[i]) for i in range(len(images))]


# --- what both use ----------------------------------------------------------------------------------------


def fact_loader(dataset: ImageDataset, s: Sizes, decoder: str) -> BatchAugmentLoader:
    """dali-ba's loader at the step's sizes, M = :data:`FACT_VIEWS`, DALI making the views on ``decoder``."""
    from dali_ba.loading.loader import BatchAugmentLoader

    return BatchAugmentLoader(
        dataset, s.batch, FACT_VIEWS, s.view_size, decoder=decoder, stage="dali", num_threads=s.workers, seed=0
    )


def pixel_difference(ours: Sequence[np.ndarray], theirs: Sequence[np.ndarray]) -> dict:
    """Paired uint8 arrays (images of any sizes, or whole batches) compared: whether all are equal, the
    largest and the mean |difference| in grey levels, and the share of values that differ."""
    import numpy as np

    shapes = [a.shape for a in ours], [b.shape for b in theirs]
    if shapes[0] != shapes[1]:
        raise ValueError(f"the arrays compared differ in shape: {shapes[0]} against {shapes[1]}")
    differences = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(ours, theirs)]
    values = sum(d.size for d in differences)
    largest = max((int(d.max()) for d in differences if d.size), default=0)
    return dict(
        equal=largest == 0,
        arrays=len(differences),
        values=values,
        max_abs_difference=largest,
        mean_abs_difference=float(sum(int(d.sum()) for d in differences) / max(1, values)),
        share_differing=float(sum(np.count_nonzero(d) for d in differences) / max(1, values)),
    )


FACTS: dict[str, tuple[Callable[[ImageDataset, Sizes], dict], str]] = {
    "batch_lifetime": (
        batch_lifetime,
        "needs a GPU: the question is DALI's GPU memory handed to torch through DLPack against kernels "
        "queued on torch's stream; the cpu decoder's batches are host memory, nothing is queued",
    ),
    "decoder_difference": (decoder_difference, "needs a GPU: the mixed decoder runs on one"),
}


def main(argv: list[str] | None = None) -> int:
    """Each fact of :data:`FACTS` in turn, ``--out`` rewritten as each ends (a failure is that fact's
    ``{"error": ...}``); 0 when none failed."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check.facts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the ImageNet-like training folder")
    parser.add_argument("--out", type=Path, required=True, help="the facts, as JSON")
    parser.add_argument("--smoke", action="store_true", help="the smoke run's sizes")
    args = parser.parse_args(argv)
    from dali_ba.data.dataset import load_dataset

    dataset, found = load_dataset(args.data), {}
    for name in FACTS:
        try:
            found[name] = measure_fact(name, dataset, SMOKE if args.smoke else FULL)
        except Exception as exc:  # one fact that fails leaves the other to measure
            found[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        gc.collect()  # its loaders' DALI pipelines go before the next fact
        print(f"{name}: {found[name]}", flush=True)
        write_atomic(args.out, (json.dumps(found, indent=1) + "\n").encode())
    return int(any("error" in fact for fact in found.values()))


if __name__ == "__main__":
    sys.exit(main())
