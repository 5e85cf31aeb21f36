"""What each augmentation draws: the parameters of view m of sample i in epoch e, as a pure function.

The draws come from a counter-based generator (Philox) keyed by the seed, with the counter set from
(epoch, dataset index): view m takes a fixed slice of that sample's stream. So the augmentations of a
sample depend on (seed, epoch, index, view) only: not on the rank, the number of ranks, the batch
or the position in an epoch, and a resumed run needs no RNG state. Both implementations of the
views, torch on CPU (:mod:`dali_ba.loading.views`) and DALI on GPU (:mod:`dali_ba.loading.pipeline`), render the
parameters drawn here, so they draw from one distribution by construction.

``imagenet``: torchvision's ``RandomResizedCrop.get_params`` (area uniform in (crop_area_min, 1) of
the image, log-uniform aspect ratio in (3/4, 4/3), ten tries, then the centred crop of the clamped
aspect ratio), resized to ``view_size`` squared; a fair coin mirrors it.
``cifar``: the image centred in a ``view_size`` square, zero-padded by 4 px, a ``view_size`` window
at one of the 9 x 9 integer shifts, a fair coin mirror, then one 16 x 16 hole (DeVries & Taylor)
whose centre is uniform over the view's pixels, clipped at the border.
``trivial`` and ``randaugment``: the ``imagenet`` crop and mirror, then automatic augmentation of
each view on its own, with the op suites of DALI's ``nvidia.dali.auto_aug`` (:data:`AUTO_OPS`, a
test checks them against DALI's) and 31 magnitude bins. TrivialAugment Wide (Müller & Hutter): one
op, uniform over the 14, at a magnitude bin uniform in [0, 30]; RandAugment (Cubuk et al.): ``n``
ops in a row, each uniform over the 14 (repeats allowed), all at bin ``m``. A fair coin negates the
magnitude of the ops that take a signed one, as DALI's ``signed_bin`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

from dali_ba.errors import UsageError

ASPECT_RATIO = (3 / 4, 4 / 3)
TRIES = 10  # RandomResizedCrop's attempts before the centre-crop fallback
CIFAR_PAD = 4  # pixels of zero padding around the image before the random crop
CUTOUT = 16  # side of the square hole, as in the paper's CIFAR-10 runs
DRAWS = {"imagenet": 2 * TRIES + 3, "cifar": 5}  # uniforms per view; view m uses draws [m*K, (m+1)*K)
MAGNITUDE_BINS = 31  # DALI's and torchvision's default for both auto-augmentations
AUTO_DRAWS = 3  # uniforms per auto-augment op: which op, which magnitude bin, the sign of the magnitude
MAX_AUTO_OPS = 16  # randaugment_n's limit: more would only blur the views into noise


@dataclass(frozen=True)
class AutoOp:
    """One op of an auto-augment suite: its magnitude of bin k is ``linspace(*magnitudes, 31)[k]``,
    negated on a drawn sign when ``signed``; ``magnitudes`` None: the op takes no magnitude."""

    name: str
    magnitudes: tuple[float, float] | None = None
    signed: bool = False


def _suite(
    translate: float, shear: float, rotate: float, enhance: tuple[float, float], posterize: float
) -> tuple[AutoOp, ...]:
    return (
        AutoOp("translate_x", (0, translate), True),
        AutoOp("translate_y", (0, translate), True),
        AutoOp("shear_x", (0, shear), True),
        AutoOp("shear_y", (0, shear), True),
        AutoOp("rotate", (0, rotate), True),
        *(AutoOp(name, enhance, True) for name in ("brightness", "contrast", "color", "sharpness")),
        AutoOp("posterize", (8, posterize)),
        AutoOp("solarize", (256, 0)),
        AutoOp("equalize"),
        AutoOp("auto_contrast"),
        AutoOp("identity"),
    )


# DALI's get_trivial_augment_wide_suite() and get_rand_augment_suite() (translations in pixels of the
# view, DALI's use_shape=False): the one definition both renderers follow.
AUTO_OPS = {
    "trivial": _suite(translate=32, shear=0.99, rotate=135, enhance=(0.01, 0.99), posterize=2),
    "randaugment": _suite(translate=100, shear=0.3, rotate=30, enhance=(0, 0.9), posterize=4),
}
AUGMENTATIONS = (*DRAWS, *AUTO_OPS)


@dataclass(frozen=True)
class ViewParams:
    """Parameters of M views of each of B samples.

    ``boxes`` (B, M, 4) int64: the source window (top, left, height, width) in image pixels, which
    may reach outside the image (zero padding); it is resized to the view size when it differs.
    ``flips`` (B, M) bool: mirror left-right after the crop. ``holes`` (B, M, 4) int64: a rectangle
    (top, left, bottom, right) of the finished view set to zero; empty (0, 0, 0, 0) when none.
    Auto-augmentation, applied in order after the mirror, n ops per view (n = 0: none): ``ops``
    (B, M, n) int32 indices into ``suite``, ``magnitude_bins`` (B, M, n) int32 in [0, 30],
    ``signs`` (B, M, n) bool (True: negate a signed op's magnitude) and ``magnitudes`` (B, M, n)
    float64, the signed magnitudes those three give (:func:`magnitudes`).
    """

    boxes: np.ndarray
    flips: np.ndarray
    holes: np.ndarray
    ops: np.ndarray
    magnitude_bins: np.ndarray
    signs: np.ndarray
    magnitudes: np.ndarray
    suite: tuple[AutoOp, ...] = ()


def uniforms(seed: int, epoch: int, indices: np.ndarray, views: int, draws: int) -> np.ndarray:
    """(B, views, draws) uniforms in [0, 1): row (b, m) depends only on (seed, epoch, indices[b], m)."""
    key = seed % 2**128
    out = np.empty((len(indices), views, draws))
    for row, index in zip(out, indices):
        bits = np.random.Philox(key=key, counter=[0, 0, epoch, int(index)])
        row[:] = np.random.Generator(bits).random((views, draws))
    return out


def random_resized_crop(u: np.ndarray, sizes: np.ndarray, area_min: float) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's ``RandomResizedCrop.get_params`` from ``2 * TRIES + 2`` uniforms per view.

    ``u`` (B, M, 2 * TRIES + 2), ``sizes`` (B, 2) image (height, width). Returns boxes (B, M, 4) and
    a (B, M) mask of the views that fell back to the centre crop.
    """
    height, width = (sizes[:, i, None, None].astype(np.float64) for i in (0, 1))  # (B, 1, 1)
    area = height * width * (area_min + (1 - area_min) * u[..., :TRIES])
    log_lo, log_hi = math.log(ASPECT_RATIO[0]), math.log(ASPECT_RATIO[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., TRIES : 2 * TRIES])
    w, h = np.rint(np.sqrt(area * aspect)), np.rint(np.sqrt(area / aspect))  # round half to even, as Python's
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=-1)[..., None]  # the first try that fits
    h, w = np.take_along_axis(h, first, -1)[..., 0], np.take_along_axis(w, first, -1)[..., 0]
    height, width = height[..., 0], width[..., 0]
    top = np.floor(u[..., 2 * TRIES] * (height - h + 1))
    left = np.floor(u[..., 2 * TRIES + 1] * (width - w + 1))
    # Fallback: the whole image, cut to the nearest aspect ratio in range, centred.
    fallback = ~fits.any(axis=-1)
    in_ratio = np.broadcast_to(width / height, fallback.shape)
    fw = np.where(in_ratio > ASPECT_RATIO[1], np.rint(height * ASPECT_RATIO[1]), width)
    fh = np.where(in_ratio < ASPECT_RATIO[0], np.rint(width / ASPECT_RATIO[0]), height)
    h, w = np.where(fallback, fh, h), np.where(fallback, fw, w)
    top = np.where(fallback, (height - fh) // 2, top)
    left = np.where(fallback, (width - fw) // 2, left)
    return np.stack([top, left, h, w], axis=-1).astype(np.int64), cast(np.ndarray, fallback)


def cifar_crop(u: np.ndarray, sizes: np.ndarray, view_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad + random crop box and cutout hole from 4 uniforms per view (dy, dx, hole y, hole x)."""
    shift = np.floor(u[..., :2] * (2 * CIFAR_PAD + 1)).astype(np.int64)  # 0..8 each axis, equally likely
    corner = (sizes[:, None, :] - view_size) // 2 - CIFAR_PAD + shift  # (B, M, 2)
    boxes = np.concatenate([corner, np.full_like(corner, view_size)], axis=-1)
    centre = np.floor(u[..., 2:4] * view_size).astype(np.int64)
    holes = np.concatenate([np.maximum(centre - CUTOUT // 2, 0), np.minimum(centre + CUTOUT // 2, view_size)], axis=-1)
    return boxes, holes


def magnitudes(suite: tuple[AutoOp, ...], ops: np.ndarray, bins: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """The signed magnitude of each drawn op (0 for an op without one), as DALI's ``Augmentation``
    computes it before its ``mag_to_param``."""
    if not suite:
        return np.zeros(ops.shape)
    table = np.array(
        [np.linspace(*op.magnitudes, MAGNITUDE_BINS) if op.magnitudes else np.zeros(MAGNITUDE_BINS) for op in suite]
    )
    negate = np.array([op.signed for op in suite])[ops] & signs
    return cast(np.ndarray, np.where(negate, -1.0, 1.0) * table[ops, bins])


def auto_augment(
    u: np.ndarray, suite: tuple[AutoOp, ...], fixed_bin: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ops, magnitude bins, signs), each (B, M, n), from ``AUTO_DRAWS * n`` uniforms per view: the
    op uniform over ``suite``, the bin uniform over the 31 (or ``fixed_bin``), a fair sign."""
    u = u.reshape(*u.shape[:-1], -1, AUTO_DRAWS)
    ops = np.minimum(np.floor(u[..., 0] * len(suite)), len(suite) - 1).astype(np.int32)
    bins = np.minimum(np.floor(u[..., 1] * MAGNITUDE_BINS), MAGNITUDE_BINS - 1).astype(np.int32)
    if fixed_bin is not None:
        bins[:] = fixed_bin
    return ops, bins, u[..., 2] < 0.5


def check_ranges(
    crop_area_min: float, randaugment_n: int, randaugment_m: int, name: Callable[[str], str] = str
) -> None:
    """Raise a one-line UsageError for the first setting out of its range; ``name`` turns a field's
    name into what the user typed (a recipe key and its flag)."""
    for field, value, ok, allowed in (
        ("crop_area_min", crop_area_min, 0 < crop_area_min <= 1, "(0, 1]"),
        ("randaugment_n", randaugment_n, 1 <= randaugment_n <= MAX_AUTO_OPS, f"[1, {MAX_AUTO_OPS}]"),
        ("randaugment_m", randaugment_m, 0 <= randaugment_m < MAGNITUDE_BINS, f"[0, {MAGNITUDE_BINS - 1}]"),
    ):
        if not ok:
            raise UsageError(f"{name(field)} must be in {allowed}, got {value}")


@dataclass(frozen=True)
class Augmentation:
    """One recipe's view augmentation: ``draw`` gives the parameters of any views of any samples."""

    kind: str = "imagenet"
    view_size: int = 224
    crop_area_min: float = 0.08
    seed: int = 0
    randaugment_n: int = 2  # ops per view, for kind "randaugment"
    randaugment_m: int = 9  # their magnitude bin in [0, 30], for kind "randaugment"

    def __post_init__(self) -> None:
        if self.kind not in AUGMENTATIONS:
            raise UsageError(f"unknown augment {self.kind!r}; known: {', '.join(AUGMENTATIONS)}")
        if self.view_size < 1:
            raise UsageError(f"view_size must be >= 1, got {self.view_size}")
        check_ranges(self.crop_area_min, self.randaugment_n, self.randaugment_m)

    @property
    def auto_ops(self) -> int:
        """Auto-augment ops per view: 0 for imagenet and cifar, 1 for trivial, n for randaugment."""
        return {"trivial": 1, "randaugment": self.randaugment_n}.get(self.kind, 0)

    @property
    def suite(self) -> tuple[AutoOp, ...]:
        """The auto-augment ops its views draw from (none for imagenet and cifar)."""
        return AUTO_OPS.get(self.kind, ())

    @property
    def draws(self) -> int:
        """Uniforms per view. The imagenet and cifar streams never change: old runs stay reproducible."""
        return DRAWS.get(self.kind, DRAWS["imagenet"]) + AUTO_DRAWS * self.auto_ops

    def draw(self, epoch: int, indices: np.ndarray, sizes: np.ndarray, views: int) -> ViewParams:
        """Parameters of ``views`` views of the samples ``indices`` (dataset indices) in ``epoch``;
        ``sizes`` (B, 2) are their decoded (height, width)."""
        sizes = np.asarray(sizes, dtype=np.int64).reshape(len(indices), 2)
        u = uniforms(self.seed, epoch, np.asarray(indices), views, self.draws)
        own = DRAWS.get(self.kind, DRAWS["imagenet"])  # the crop's and the flip's uniforms come first
        u, auto = u[..., :own], u[..., own:]
        flips = u[..., -1] < 0.5
        if self.kind == "cifar":
            boxes, holes = cifar_crop(u[..., :-1], sizes, self.view_size)
        else:
            boxes, _ = random_resized_crop(u[..., :-1], sizes, self.crop_area_min)
            holes = np.zeros_like(boxes)
        suite = self.suite
        ops, bins, signs = auto_augment(auto, suite, self.randaugment_m if self.kind == "randaugment" else None)
        return rendered_params(suite, boxes, flips, holes, ops, bins, signs)


def view_regions(boxes: np.ndarray, sizes: np.ndarray, union: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """What to decode of each image for its views: the union of its M boxes (B, M, 4) cut to the image
    (``sizes`` (B, 2), at least one pixel), or with ``union`` False the whole image. Returns the
    regions (B, 4) int32 (top, left, height, width) and the boxes moved into them: a view of the
    decoded region is the view of the whole image, pixel for pixel (what lies outside a region
    lies outside the image, zero padding in both)."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(len(boxes), 1, 2)
    if union:
        first = np.clip(boxes[..., :2], 0, sizes - 1).min(axis=1)  # (B, 2)
        last = np.clip(boxes[..., :2] + boxes[..., 2:], 1, sizes).max(axis=1)
    else:
        first, last = np.zeros((len(boxes), 2), dtype=np.int64), sizes[:, 0]
    last = np.maximum(last, first + 1)
    moved = boxes.copy()
    moved[..., :2] -= first[:, None]
    return np.concatenate([first, last - first], axis=-1).astype(np.int32), moved


def rendered_params(
    suite: tuple[AutoOp, ...],
    boxes: np.ndarray,
    flips: np.ndarray,
    holes: np.ndarray | None = None,
    ops: np.ndarray | None = None,
    bins: np.ndarray | None = None,
    signs: np.ndarray | None = None,
) -> ViewParams:
    """The :class:`ViewParams` of the arrays a view graph takes (the decode graph hands them on to
    torch's view stage with the regions it decoded): no holes and no auto-augment ops where absent."""
    none = np.zeros((*flips.shape, 0), dtype=np.int32)
    holes = np.zeros_like(boxes) if holes is None else holes
    ops, bins = (none, none) if ops is None or bins is None else (ops, bins)
    signs = none.astype(bool) if signs is None else signs.astype(bool)
    return ViewParams(boxes, flips.astype(bool), holes, ops, bins, signs, magnitudes(suite, ops, bins, signs), suite)
