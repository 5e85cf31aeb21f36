"""Decode once, then M views: the DALI graphs behind the loaders.

Each graph reads B encoded files, decodes each one exactly once, and only then branches: M
independent random augmentations of the same decoded image, stacked to (M, H, W, 3) uint8 per sample.
The "mixed" decoder (GPU) puts everything after it on the GPU; the "cpu" decoder keeps it all on CPU.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from nvidia.dali import fn, pipeline_def, types

READER_NAME = "reader"


def imagenet_view(images, view_size: int, crop_area_min: float):
    """ImageNet training augmentation: random resized crop (scale, ratio as torchvision) + h-flip."""
    view = fn.random_resized_crop(
        images, size=(view_size, view_size), random_area=(crop_area_min, 1.0), random_aspect_ratio=(3 / 4, 4 / 3)
    )
    return fn.flip(view, horizontal=fn.random.coin_flip())


CIFAR_PAD = 4  # pixels of zero padding around the image before the random crop
CUTOUT = 16  # side of the square hole (DeVries & Taylor 2017), as in the paper's CIFAR-10 runs


def cifar_view(images, view_size: int, crop_area_min: float):
    """CIFAR augmentation: pad by 4 px, random ``view_size`` crop, h-flip, cutout of one 16x16 hole
    (centre uniform over the image, clipped at the border). ``crop_area_min`` is not used."""
    side = view_size + 2 * CIFAR_PAD
    padded = fn.crop(images, crop=(side, side), out_of_bounds_policy="pad", fill_values=0)  # centred window
    offsets = [i / (2 * CIFAR_PAD) for i in range(2 * CIFAR_PAD + 1)]  # each of the 9 integer shifts, equally
    view = fn.crop(padded, crop=(view_size, view_size), crop_pos_x=fn.random.uniform(values=offsets),
                   crop_pos_y=fn.random.uniform(values=offsets))
    view = fn.flip(view, horizontal=fn.random.coin_flip())
    centre = fn.random.uniform(values=[float(i) for i in range(view_size)], shape=2)
    return fn.erase(view, anchor=centre, shape=(CUTOUT, CUTOUT), axis_names="HW", centered_anchor=True,
                    fill_value=0)


AUGMENTATIONS: dict[str, Callable] = {"imagenet": imagenet_view, "cifar": cifar_view}


def _read_and_decode(files: Sequence[str], labels: Sequence[int], decoder: str):
    jpegs, label = fn.readers.file(files=list(files), labels=list(labels), random_shuffle=False, name=READER_NAME)
    return fn.decoders.image(jpegs, device=decoder, output_type=types.RGB), label


@pipeline_def(enable_checkpointing=True)  # reader position + RNG states: exact mid-epoch resume
def batch_augment_pipeline(
    files: Sequence[str],
    labels: Sequence[int],
    views: int,
    view_size: int,
    augment: str = "imagenet",
    crop_area_min: float = 0.08,
    decoder: str = "cpu",
):
    """Per sample: (M, view_size, view_size, 3) uint8 views of one decode, and its label."""
    images, label = _read_and_decode(files, labels, decoder)
    make_view = AUGMENTATIONS[augment]
    return fn.stack(*[make_view(images, view_size, crop_area_min) for _ in range(views)]), label


@pipeline_def
def center_crop_pipeline(files: Sequence[str], labels: Sequence[int], resize: int, crop: int, decoder: str = "cpu"):
    """Validation: resize the shorter side to ``resize``, then a centred ``crop`` square; one view."""
    images, label = _read_and_decode(files, labels, decoder)
    images = fn.resize(images, resize_shorter=resize)
    return fn.crop(images, crop=(crop, crop)), label
