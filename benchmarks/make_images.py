"""Benchmark JPEGs that resemble ImageNet: ~400x350, quality 90, cut from real photographs.

    python benchmarks/make_images.py [--out data/bench] [--count 1024] [--seed 0]

Synthetic shapes compress far better than photographs and so decode faster; a loader benchmark
needs real image statistics. The sources are the colour photographs shipped inside scikit-image
and scikit-learn (no download); each output is a random crop of one of them, rescaled to a random
size around 400x350 (ImageNet's typical size), randomly mirrored, saved as 4:2:0 JPEG at quality 90.
Class folder = source photo, so the tree reads as an ImageNet-style dataset.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = (360, 440), (310, 390)  # output size ranges: ~400x350 on average
QUALITY = 90


def source_photos() -> dict[str, np.ndarray]:
    """Name -> (H, W, 3) uint8 for every colour photograph shipped with scikit-image / scikit-learn."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    loaders: dict[str, Callable[[], np.ndarray]] = {
        name: getattr(skimage.data, name)
        for name in ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")
    }
    photos = {name: load() for name, load in loaders.items()}
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images):
        photos[Path(path).stem] = image
    return photos


def cut(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random crop of ``photo`` (35-100 % of its area, the output's aspect) resized to the output size."""
    width, height = int(rng.integers(*WIDTH, endpoint=True)), int(rng.integers(*HEIGHT, endpoint=True))
    src_h, src_w = photo.shape[:2]
    area = rng.uniform(0.35, 1.0) * src_h * src_w
    crop_w = min(src_w, int(round(np.sqrt(area * width / height))))
    crop_h = min(src_h, int(round(crop_w * height / width)))
    left, top = int(rng.integers(0, src_w - crop_w + 1)), int(rng.integers(0, src_h - crop_h + 1))
    image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w]).resize((width, height), Image.LANCZOS)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def write_images(out: Path, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` JPEGs to ``out/<photo>/<n>.jpg``, dealt round-robin over the source photos."""
    rng = np.random.default_rng(seed)
    photos = source_photos()
    names = sorted(photos)
    written = []
    for index in range(count):
        name = names[index % len(names)]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:05d}.jpg"
        cut(photos[name], rng).save(path, quality=QUALITY, subsampling=2)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_images.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/bench"), help="output folder (default data/bench)")
    parser.add_argument("--count", type=int, default=1024, help="number of JPEGs (default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    written = write_images(args.out, args.count, args.seed)
    sizes = [path.stat().st_size for path in written]
    print(f"wrote {len(written)} JPEGs to {args.out} (mean {np.mean(sizes) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
