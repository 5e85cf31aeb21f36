"""Benchmark JPEGs that resemble ImageNet: ~400x350, quality 90, cut from real photographs.

    python -m benchmarks.make_images [--out data/bench] [--count 1024] [--seed 0] [--imagenet-like]

Synthetic shapes compress far better than photographs and so decode faster; a loader benchmark
needs real image statistics. The sources are the colour photographs shipped inside scikit-image
and scikit-learn (no download); each output is a random crop of one of them, rescaled to a random
size around 400x350 (ImageNet's typical size), randomly mirrored, saved as 4:2:0 JPEG at quality 90.
Class folder = source photo, so the tree reads as an ImageNet-style dataset.

``--imagenet-like`` makes them at ImageNet's typical training-file size instead: about 500x375 and
about 110 KB (quality 95 plus a little Gaussian luminance noise, as a camera's sensor leaves: the
sources, upscaled, are smoother than ImageNet's photographs and would compress to half the bytes).
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
# ImageNet's training JPEGs: ~500x375, ~110 KB (0.6 bytes per pixel). These: 90 files averaged 499x372, 111 KB.
IMAGENET_LIKE = dict(width=(450, 550), height=(330, 420), quality=95, noise=9.0)


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


def cut(
    photo: np.ndarray,
    rng: np.random.Generator,
    width_range: tuple[int, int] = WIDTH,
    height_range: tuple[int, int] = HEIGHT,
) -> Image.Image:
    """A random crop of ``photo`` (35-100 % of its area, the output's aspect) resized to a random size in the ranges."""
    width, height = int(rng.integers(*width_range, endpoint=True)), int(rng.integers(*height_range, endpoint=True))
    src_h, src_w = photo.shape[:2]
    area = rng.uniform(0.35, 1.0) * src_h * src_w
    crop_w = min(src_w, int(round(np.sqrt(area * width / height))))
    crop_h = min(src_h, int(round(crop_w * height / width)))
    left, top = int(rng.integers(0, src_w - crop_w + 1)), int(rng.integers(0, src_h - crop_h + 1))
    image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w]).resize((width, height), Image.LANCZOS)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def add_noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """``image`` plus Gaussian luminance noise of ``sigma`` levels (the same on R, G and B)."""
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, sigma, (image.height, image.width, 1))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def write_images(
    out: Path,
    count: int,
    seed: int = 0,
    *,
    width: tuple[int, int] = WIDTH,
    height: tuple[int, int] = HEIGHT,
    quality: int = QUALITY,
    noise: float = 0.0,
) -> list[Path]:
    """Write ``count`` JPEGs to ``out/<photo>/<n>.jpg``, dealt round-robin over the source photos
    (sizes drawn from ``width`` x ``height``; ``noise`` > 0 adds :func:`add_noise`)."""
    rng = np.random.default_rng(seed)
    photos = source_photos()
    names = sorted(photos)
    written = []
    for index in range(count):
        name = names[index % len(names)]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:05d}.jpg"
        image = cut(photos[name], rng, width, height)
        image = add_noise(image, noise, rng) if noise > 0 else image
        image.save(path, quality=quality, subsampling=2)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.make_images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/bench"), help="output folder (default data/bench)")
    parser.add_argument("--count", type=int, default=1024, help="number of JPEGs (default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--imagenet-like",
        action="store_true",
        help="ImageNet's typical training-file size: ~500x375, ~110 KB (default: ~400x350, ~37 KiB)",
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    written = write_images(args.out, args.count, args.seed, **(IMAGENET_LIKE if args.imagenet_like else {}))
    sizes = [path.stat().st_size for path in written]
    print(f"wrote {len(written)} JPEGs to {args.out} (mean {np.mean(sizes) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
