"""Augmentation parameters: a pure function of (seed, epoch, sample, view), distributed as torchvision's."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from scipy.stats import chi2_contingency, chisquare, ks_2samp

from dali_ba.errors import UsageError
from dali_ba.loading.augment import CIFAR_PAD, CUTOUT, Augmentation

HEIGHT, WIDTH = 349, 399  # the benchmark images' mean size
DRAWS = 40_000  # enough for the two-sample tests to tell area (0.1, 1) from (0.08, 1)


def ours(kind="imagenet", crop_area_min=0.08, size=(HEIGHT, WIDTH), view_size=224):
    """DRAWS views' parameters: 400 samples x 100 views, one image size."""
    samples, views = 400, DRAWS // 400
    drawn = Augmentation(kind, view_size, crop_area_min, seed=5).draw(3, np.arange(samples), [size] * samples, views)
    return drawn.boxes.reshape(-1, 4), drawn.flips.ravel(), drawn.holes.reshape(-1, 4)


def torchvisions(scale=(0.08, 1.0), size=(HEIGHT, WIDTH), draws=DRAWS):
    """torchvision's own RandomResizedCrop.get_params, ``draws`` times: (top, left, height, width) rows."""
    torch.manual_seed(0)
    image = torch.empty(3, *size)
    return np.array([T.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3)) for _ in range(draws)])


def features(boxes, size=(HEIGHT, WIDTH)):
    """What RandomResizedCrop decides: area share, log aspect, and where the box sits in its free range."""
    top, left, h, w = boxes.T.astype(float)
    H, W = size
    return {
        "area": h * w / (H * W),
        "log_aspect": np.log(w / h),
        "top": top / np.maximum(H - h, 1),
        "left": left / np.maximum(W - w, 1),
    }


@pytest.fixture(scope="module")
def reference():
    return features(torchvisions())


def test_random_resized_crop_draws_from_torchvisions_distribution(reference):
    boxes, flips, holes = ours()
    mine = features(boxes)
    for name in reference:
        assert ks_2samp(mine[name], reference[name]).pvalue > 1e-3, name
    assert abs(flips.mean() - 0.5) < 4 * math.sqrt(0.25 / DRAWS)  # a fair coin
    assert not holes.any()
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= HEIGHT).all() and (left + w <= WIDTH).all()


def test_a_wrong_area_range_is_told_apart(reference):
    boxes, _, _ = ours(crop_area_min=0.1)  # torchvision's default is 0.08
    assert ks_2samp(features(boxes)["area"], reference["area"]).pvalue < 1e-6


@pytest.mark.parametrize("size", [(20, 400), (400, 20)])
def test_when_no_try_fits_the_fallback_is_torchvisions(size):
    """Images too far from the aspect range for any try: torchvision's centre crop of the clamped ratio."""
    boxes, _, _ = ours(size=size)
    expected = {tuple(box) for box in torchvisions(size=size, draws=200)}
    assert {tuple(box) for box in boxes} == expected and len(expected) == 1


def test_cifar_shifts_match_torchvisions_random_crop_and_holes_are_uniform():
    boxes, flips, holes = ours("cifar", size=(32, 32), view_size=32)
    torch.manual_seed(0)
    padded = torch.empty(3, 32 + 2 * CIFAR_PAD, 32 + 2 * CIFAR_PAD)
    theirs = np.array([T.RandomCrop.get_params(padded, (32, 32)) for _ in range(4000)]) - CIFAR_PAD
    for axis in (0, 1):
        values = np.arange(-CIFAR_PAD, CIFAR_PAD + 1)
        table = [[(boxes[:, axis] == v).sum() for v in values], [(theirs[:, axis] == v).sum() for v in values]]
        assert chi2_contingency(table).pvalue > 1e-3
    assert (boxes[:, 2:] == 32).all()
    assert abs(flips.mean() - 0.5) < 4 * math.sqrt(0.25 / DRAWS)
    centre = (holes[:, :2] + holes[:, 2:]) / 2  # of the clipped hole; the unclipped centre is uniform on 0..31
    unclipped = np.where(holes[:, :2] == 0, holes[:, 2:] - CUTOUT // 2, holes[:, :2] + CUTOUT // 2)
    assert ((0 <= centre) & (centre <= 32)).all() and (holes[:, 2:] - holes[:, :2] <= CUTOUT).all()
    counts = np.bincount(unclipped.ravel(), minlength=32)
    assert len(counts) == 32 and chisquare(counts).pvalue > 1e-3


def test_parameters_are_a_pure_function_of_seed_epoch_sample_and_view():
    aug = Augmentation("imagenet", 224, 0.08, seed=1)
    sizes = [(300, 400), (500, 333)]
    batch = aug.draw(2, np.array([7, 11]), sizes, 4)
    alone = aug.draw(2, np.array([11]), sizes[1:], 10)  # another batch, another M: the same views of sample 11
    assert np.array_equal(batch.boxes[1], alone.boxes[0, :4]) and np.array_equal(batch.flips[1], alone.flips[0, :4])
    assert np.array_equal(aug.draw(2, np.array([7]), sizes[:1], 4).boxes[0], batch.boxes[0])
    different = [
        aug.draw(3, np.array([7]), sizes[:1], 4),
        Augmentation(seed=2).draw(2, np.array([7]), sizes[:1], 4),
        aug.draw(2, np.array([8]), sizes[:1], 4),
    ]  # another epoch, seed, sample
    assert all(not np.array_equal(d.boxes[0], batch.boxes[0]) for d in different)
    assert len({tuple(b) for b in alone.boxes[0]}) == 10  # the views of a sample differ


def test_bad_augmentation_arguments():
    with pytest.raises(UsageError, match="unknown augment 'nope'"):
        Augmentation("nope")
    with pytest.raises(UsageError, match=r"crop_area_min must be in \(0, 1\], got 0"):
        Augmentation(crop_area_min=0)
    with pytest.raises(UsageError, match="view_size must be >= 1"):
        Augmentation(view_size=0)


@pytest.mark.parametrize("kind, views", [("imagenet", 1), ("imagenet", 4), ("cifar", 3), ("randaugment", 2)])
def test_the_views_of_a_region_are_the_views_of_the_whole_image(kind, views):
    """Torch's view stage renders the views of each decoded region, boxes moved into it, exactly as
    those of the whole image: the region holds every pixel of the image a box covers (cifar's boxes
    reach past the image, into zero padding either way)."""
    from dali_ba.loading.augment import view_regions
    from dali_ba.loading.views import TorchViews

    sizes = np.array([[61, 80], [40, 90], [75, 33], [50, 50], [28, 28]])
    aug = Augmentation(kind, 24, 0.08, seed=6)
    drawn = aug.draw(0, np.arange(5), sizes, views)
    regions, moved = view_regions(drawn.boxes, sizes)
    images = [np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8) for i, size in enumerate(sizes)]
    cut = [image[top : top + h, left : left + w] for image, (top, left, h, w) in zip(images, regions.tolist())]
    whole = TorchViews(1, 5, views, 24)(images, drawn).clone()
    from_regions = TorchViews(1, 5, views, 24)(cut, dataclasses.replace(drawn, boxes=moved))
    assert torch.equal(whole, from_regions)
    assert (regions[:, :2] >= 0).all() and (regions[:, :2] + regions[:, 2:] <= sizes).all()
    if kind != "cifar":  # imagenet boxes lie inside the image: the region is exactly their union
        ends = drawn.boxes[..., :2] + drawn.boxes[..., 2:]
        assert np.array_equal(regions[:, :2], drawn.boxes[..., :2].min(axis=1))
        assert np.array_equal(regions[:, :2] + regions[:, 2:], ends.max(axis=1))
    if views == 1:
        assert np.array_equal(moved[:, 0, :2], np.zeros((5, 2))) and np.array_equal(
            moved[..., 2:], drawn.boxes[..., 2:]
        )


def test_a_region_is_never_empty_and_can_be_the_whole_image():
    from dali_ba.loading.augment import view_regions

    sizes = np.array([[10, 20], [10, 20]])
    outside = np.array([[[12, 25, 4, 4]], [[-9, -9, 5, 5]]])  # boxes wholly past the image's far and near corners
    regions, moved = view_regions(outside, sizes)
    assert regions.tolist() == [[9, 19, 1, 1], [0, 0, 1, 1]] and regions.dtype == np.int32
    assert moved.tolist() == [[[3, 6, 4, 4]], [[-9, -9, 5, 5]]]
    whole, same = view_regions(outside, sizes, union=False)
    assert whole.tolist() == [[0, 0, 10, 20]] * 2 and np.array_equal(same, outside)
