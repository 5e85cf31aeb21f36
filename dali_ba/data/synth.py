"""Embedded demo data: a small ImageNet-style JPEG dataset, generated deterministically.

    python -m dali_ba.data.synth --out data/demo [--train-per-class 64] [--val-per-class 20] [--seed 0]

Ten classes = five shapes (disc, square, triangle, ring, cross) x two colour families (warm, cool),
drawn at a random place and scale over a tinted noise background with distractor strokes, on canvases
of varied size and aspect ratio. The class survives a random crop and a horizontal flip, but only
when the crop keeps the shape, so a model has to learn it rather than read one pixel.
"""

from __future__ import annotations

import argparse
import colorsys
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "ring", "cross")
FAMILIES = {"warm": (0.0, 0.14), "cool": (0.50, 0.72)}  # hue ranges
CLASSES = tuple(f"{shape}_{family}" for family in FAMILIES for shape in SHAPES)


def _colour(
    rng: np.random.Generator, hue_range: tuple[float, float], saturation: tuple[float, float]
) -> tuple[int, int, int]:
    h = rng.uniform(*hue_range) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(*saturation), rng.uniform(0.55, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Low-saturation smooth noise: a coarse random grid scaled up, plus fine grain."""
    coarse = rng.uniform(60, 200, size=(4, 4, 3)).astype(np.float32)
    tint = rng.uniform(-25, 25, size=3)
    base = np.array(
        Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC), np.float32
    )
    grain = rng.normal(0, 12, size=(height, width, 1))
    return Image.fromarray(np.clip(base + tint + grain, 0, 255).astype(np.uint8))


def draw_sample(shape: str, family: str, rng: np.random.Generator) -> Image.Image:
    """One image of class (shape, family)."""
    width, height = int(rng.integers(48, 129)), int(rng.integers(48, 129))
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):  # distractor strokes in any colour
        points = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(2)]
        draw.line(points, fill=_colour(rng, (0, 1), (0.2, 0.9)), width=int(rng.integers(1, 4)))
    side = min(width, height)
    r = rng.uniform(0.22, 0.38) * side
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    fill = _colour(rng, FAMILIES[family], (0.55, 1.0))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "disc":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    elif shape == "cross":
        t = r / 3
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    return image


def write_dataset(out: str | Path, train_per_class: int = 64, val_per_class: int = 20, seed: int = 0) -> Path:
    """Write ``out/train/<class>/*.jpg`` and ``out/val/<class>/*.jpg``; same seed, same bytes."""
    out = Path(out)
    for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for label, name in enumerate(CLASSES):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            shape, family = name.split("_")
            for i in range(count):
                rng = np.random.default_rng([seed, split_id, label, i])
                draw_sample(shape, family, rng).save(folder / f"{name}_{i:04d}.jpg", quality=90)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dali_ba.data.synth", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (train/ and val/ are created inside)")
    parser.add_argument("--train-per-class", type=int, default=64)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.train_per_class < 1 or args.val_per_class < 1:
        print("synth: error: --train-per-class and --val-per-class must be >= 1", file=sys.stderr)
        return 2
    out = write_dataset(args.out, args.train_per_class, args.val_per_class, args.seed)
    n = len(CLASSES) * (args.train_per_class + args.val_per_class)
    print(f"wrote {n} JPEGs in {len(CLASSES)} classes to {out}/train and {out}/val")
    return 0


if __name__ == "__main__":
    sys.exit(main())
