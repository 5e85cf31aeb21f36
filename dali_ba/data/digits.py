"""scikit-learn's handwritten digits (1,797 real 8x8 scans shipped inside the package) as JPEG class folders.

    python -m dali_ba.data.digits --out data/digits [--size 32] [--train 800 --val 400]

Each 8x8 image (16 grey levels) is scaled to 0-255, upscaled to ``size`` px (bicubic), written as an
RGB JPEG (quality 95) into train/<digit>/ or val/<digit>/; the split is stratified by digit and fixed
by ``seed``. A small real data set for the paper reproduction (``dali-ba reproduce``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: str | Path, train: int = 800, val: int = 400, size: int = 32, seed: int = 0) -> Path:
    """Write ``train`` + ``val`` digits (stratified, at most all 1,797) under ``out``; returns ``out``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if train < 10 or val < 10 or train + val > len(digits.images):
        raise ValueError(f"need 10 <= train, 10 <= val and train + val <= {len(digits.images)}, got {train} + {val}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.images))
    # Stratified: deal each digit's images out in turn, so both splits keep the class balance.
    by_class = [order[digits.target[order] == c] for c in range(10)]
    dealt = [i for i in itertools.chain.from_iterable(itertools.zip_longest(*by_class)) if i is not None]
    splits = {"train": dealt[:train], "val": dealt[train : train + val]}
    out = Path(out)
    for split, indices in splits.items():
        for c in range(10):
            (out / split / str(c)).mkdir(parents=True, exist_ok=True)
        for i in indices:
            grey = Image.fromarray((digits.images[i] * (255 / 16)).round().astype(np.uint8), mode="L")
            image = grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
            image.save(out / split / str(digits.target[i]) / f"digit_{i:04d}.jpg", quality=95)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dali_ba.data.digits", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (train/ and val/ are created inside)")
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--val", type=int, default=400)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        write_digits(args.out, args.train, args.val, args.size, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {args.train} training and {args.val} validation digits to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
