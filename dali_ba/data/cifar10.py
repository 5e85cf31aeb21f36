"""Turn the official CIFAR-10 python batches into class folders of PNGs the loaders read.

    python -m dali_ba.data.cifar10 --src cifar-10-batches-py --out data/cifar10

writes data/cifar10/train/<class>/<n>.png (50,000) and data/cifar10/test/<class>/<n>.png (10,000).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image

SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _unpickle(path: Path) -> dict[bytes, Any]:
    if not path.is_file():
        raise SystemExit(
            f"python -m dali_ba.data.cifar10: error: {path} not found (expected the official "
            "cifar-10-batches-py folder)"
        )
    with open(path, "rb") as file:
        return cast("dict[bytes, Any]", pickle.load(file, encoding="bytes"))


def convert(src: Path, out: Path) -> dict[str, int]:
    """Write every image of every split; returns images written per split."""
    names = [n.decode() for n in _unpickle(src / "batches.meta")[b"label_names"]]
    written = {}
    for split, batches in SPLITS.items():
        for name in names:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        count = 0
        for batch in batches:
            raw = _unpickle(src / batch)
            images = np.asarray(raw[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for image, label in zip(images, raw[b"labels"]):
                Image.fromarray(image).save(out / split / names[label] / f"{count:05d}.png")
                count += 1
        written[split] = count
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dali_ba.data.cifar10", description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="the extracted cifar-10-batches-py folder")
    parser.add_argument("--out", type=Path, required=True, help="where train/ and test/ go")
    args = parser.parse_args(argv)
    written = convert(args.src, args.out)
    print(f"wrote {written['train']} training and {written['test']} test images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
