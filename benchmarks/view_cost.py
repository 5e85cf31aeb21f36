"""Where the per-view time goes: CPU milliseconds of each step, DALI and dali-ba's torch views against
torchvision and PIL.

    python -m benchmarks.view_cost [--data data/bench] [--views 10] [--rounds 5] [--out benchmarks/results]

Everything runs on one thread. Each number is the fastest of ``--rounds`` interleaved repetitions,
so that other work on a shared machine inflates it as little as possible. DALI pipelines run
synchronously (no prefetching: one ``run()`` is one batch of work) and DALI steps are measured as
the difference between two graphs (decode + M views minus decode alone) divided by M, with M
distinct operators (a DALI graph merges identical operators, so each view has its own random seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from dali_ba.data.dataset import load_dataset  # noqa: E402
from dali_ba.loading.tensors import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

AREA, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
BATCH = 32


def dali_graphs(size: int) -> dict[str, Callable | None]:
    """Name -> one view from a decoded image (None: no view, decode only)."""
    from nvidia.dali import fn, types

    def rrc(image, **kw):
        return fn.random_resized_crop(image, size=(size, size), random_area=AREA, random_aspect_ratio=RATIO, **kw)

    def roi_flip(image):
        """The crop window from random_crop_generator, the flip folded into resize by swapping the ROI's x ends."""
        anchor, shape = fn.random_crop_generator(image.shape(), random_area=AREA, random_aspect_ratio=RATIO)
        start = fn.cast(anchor, dtype=types.FLOAT)
        end = start + fn.cast(shape, dtype=types.FLOAT)
        flip = fn.cast(fn.random.coin_flip(), dtype=types.FLOAT)
        x0 = start[1] * (1 - flip) + end[1] * flip
        x1 = end[1] * (1 - flip) + start[1] * flip
        return fn.resize(image, size=(size, size), roi_start=fn.stack(start[0], x0), roi_end=fn.stack(end[0], x1))

    return {
        "decode": None,
        "crop+resize (bilinear, antialias)": rrc,
        "+ flip": lambda image: fn.flip(rrc(image), horizontal=fn.random.coin_flip()),
        "+ flip + stack": lambda image: fn.flip(rrc(image), horizontal=fn.random.coin_flip()),
        "flip folded into resize ROI (+ stack)": roi_flip,
        "crop+resize without antialias": lambda image: rrc(image, antialias=False),
        "crop+resize nearest neighbour": lambda image: rrc(image, interp_type=types.INTERP_NN),
    }


def dali_costs(files: list[str], views: int, size: int, rounds: int) -> dict[str, float]:
    """CPU ms per sample of each DALI graph (decode once + ``views`` views), one thread."""
    from nvidia.dali import fn, pipeline_def, types

    graphs = dali_graphs(size)
    stacked = {"+ flip + stack", "flip folded into resize ROI (+ stack)"}

    def build(name):
        @pipeline_def(batch_size=BATCH, num_threads=1, device_id=None, seed=1, exec_async=False, exec_pipelined=False)
        def pipe():
            jpegs, _ = fn.readers.file(files=files, name="reader")
            image = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            if graphs[name] is None:
                return image
            out = [graphs[name](image) for _ in range(views)]
            return fn.stack(*out) if name in stacked else tuple(out)

        p = pipe()
        p.build()
        for _ in range(2):
            p.run()
        return p

    pipes = {name: build(name) for name in graphs}
    return best_of(rounds, {name: (lambda p=p: p.run()) for name, p in pipes.items()}, BATCH)


def stage_costs(files: list[str], views: int, size: int, rounds: int) -> dict[str, float]:
    """ms per view of dali-ba's CPU view stage on one thread: drawing the parameters, and rendering
    (crop, resize, flip, write into the batch) from decoded images."""
    import numpy as np
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    from dali_ba.loading.augment import Augmentation
    from dali_ba.loading.views import render_views

    torch.set_num_threads(1)
    images = [decode_jpeg(read_file(f), mode=ImageReadMode.RGB).permute(1, 2, 0).contiguous() for f in files[:BATCH]]
    sizes, indices = [image.shape[:2] for image in images], np.arange(BATCH)
    params = Augmentation(view_size=size).draw(0, indices, sizes, views)
    out = torch.empty((BATCH, views, size, size, 3), dtype=torch.uint8)

    def render() -> None:
        for b, image in enumerate(images):
            render_views(image, params, b, out[b])

    steps = {"draw": lambda: Augmentation(view_size=size).draw(0, indices, sizes, views), "render": render}
    return best_of(rounds, steps, BATCH * views)


def best_of(rounds: int, steps: dict[str, Callable[[], object]], per: int) -> dict[str, float]:
    """Fastest ms per item of each step over ``rounds`` interleaved calls; ``per`` items per call."""
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], (time.perf_counter() - start) / per * 1e3)
    return best


def torch_costs(files: list[str], size: int, rounds: int) -> dict[str, float]:
    """CPU ms per call of the torchvision / PIL steps the peers use, one thread."""
    import torchvision.transforms as T
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import v2

    torch.set_num_threads(1)
    tuned = v2.Compose([v2.RandomResizedCrop(size, scale=AREA, ratio=RATIO, antialias=True), v2.RandomHorizontalFlip()])
    paper = T.Compose(
        [
            T.RandomResizedCrop(size, scale=AREA, ratio=RATIO),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    paper_crop = T.Compose([T.RandomResizedCrop(size, scale=AREA, ratio=RATIO), T.RandomHorizontalFlip()])
    sample = files[:BATCH]
    tensors = [decode_jpeg(read_file(f), mode=ImageReadMode.RGB) for f in sample]
    pils = [Image.open(f).convert("RGB") for f in sample]
    steps = {
        "torchvision decode_jpeg": lambda f: decode_jpeg(read_file(f), mode=ImageReadMode.RGB),
        "v2 crop+resize+flip, uint8": tuned,
        "PIL decode": lambda f: Image.open(f).convert("RGB"),
        "PIL crop+resize+flip": paper_crop,
        "PIL crop+resize+flip+ToTensor+Normalize": paper,
    }
    inputs = {name: sample if "decode" in name else tensors if "v2" in name else pils for name in steps}
    batches = {
        name: (lambda step=step, items=inputs[name]: [step(item) for item in items]) for name, step in steps.items()
    }
    return best_of(rounds, batches, BATCH)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.view_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "bench", help="made by benchmarks.make_images")
    parser.add_argument("--views", type=int, default=10, help="views per sample in the DALI graphs (default 10)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=25, help="repetitions; the fastest counts (default 25)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"--data {args.data} not found (make it: python -m benchmarks.make_images --out {args.data})")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    files = list(load_dataset(args.data).files)
    dali = dali_costs(files, args.views, args.size, args.rounds)
    stage = stage_costs(files, args.views, args.size, args.rounds)
    tv = torch_costs(files, args.size, args.rounds)
    decode = dali["decode"]
    rows = [("DALI decode (per sample)", decode)]
    rows += [(f"DALI {name} (per view)", (ms - decode) / args.views) for name, ms in dali.items() if name != "decode"]
    rows += [
        ("dali-ba parameter draws (per view)", stage["draw"]),
        ("dali-ba torch view: crop + resize + flip into the batch (per view)", stage["render"]),
    ]
    rows += [(f"{name} (per call)", ms) for name, ms in tv.items()]
    width = max(len(name) for name, _ in rows)
    for name, ms in rows:
        print(f"{name:{width}s} {ms:7.3f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    record = dict(
        views=args.views,
        size=args.size,
        rounds=args.rounds,
        unit="ms, one thread, fastest of rounds",
        dali_pipeline_ms_per_sample=dali,
        torch_ms_per_call=tv,
        stage_ms_per_view=stage,
        rows={name: round(ms, 4) for name, ms in rows},
    )
    (args.out / "view_cost.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out / 'view_cost.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
