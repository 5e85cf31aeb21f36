"""Auto-augmentation per view (augment "trivial" and "randaugment"): one definition in augment.py,
drawn per (seed, epoch, sample, view); torch (CPU view stage) and DALI (GPU graph, run here on its
CPU backend) render the same draws the same way."""

import hashlib

import numpy as np
import pytest
import torch
from conftest import identity_image
from scipy.stats import chisquare

from dali_ba import BatchAugmentLoader
from dali_ba.errors import UsageError
from dali_ba.loading.augment import AUTO_OPS, MAGNITUDE_BINS, Augmentation

SAMPLES, VIEWS = 1000, 8  # 8000 views: the chi-square tests below see 570 per op, 260 per bin


def drawn(kind: str, **kwargs):
    return Augmentation(kind, 224, seed=3, **kwargs).draw(1, np.arange(SAMPLES), [[300, 400]] * SAMPLES, VIEWS)


@pytest.mark.parametrize("kind", list(AUTO_OPS))
def test_the_op_tables_are_dalis_suites(kind):
    """augment.py's copy of the suite (the one definition both renderers read) is DALI's own."""
    from dali_ba.loading.pipeline import dali_suite

    theirs = [(op.name, op.mag_range and tuple(op.mag_range), op.randomly_negate) for op in dali_suite(kind)]
    assert [(op.name, op.magnitudes, op.signed) for op in AUTO_OPS[kind]] == theirs


def test_trivial_draws_one_uniform_op_at_a_uniform_bin_with_a_fair_sign():
    params = drawn("trivial")
    assert params.ops.shape == params.magnitude_bins.shape == params.signs.shape == (SAMPLES, VIEWS, 1)
    ops = np.bincount(params.ops.ravel(), minlength=len(AUTO_OPS["trivial"]))
    bins = np.bincount(params.magnitude_bins.ravel(), minlength=MAGNITUDE_BINS)
    assert len(ops) == 14 and len(bins) == MAGNITUDE_BINS
    assert chisquare(ops).pvalue > 1e-3 and chisquare(bins).pvalue > 1e-3
    assert abs(params.signs.mean() - 0.5) < 4 * 0.5 / np.sqrt(params.signs.size)  # 4 sigma
    crops = Augmentation("trivial", 224, seed=3).draw(1, np.arange(4), [[300, 400]] * 4, VIEWS)
    assert not np.array_equal(crops.boxes[:, 0], crops.boxes[:, 1])  # the crop is still drawn per view


def test_randaugment_draws_n_uniform_ops_at_bin_m():
    params = drawn("randaugment", randaugment_n=3, randaugment_m=17)
    assert params.ops.shape == (SAMPLES, VIEWS, 3)
    assert (params.magnitude_bins == 17).all()
    for slot in range(3):
        assert chisquare(np.bincount(params.ops[..., slot].ravel(), minlength=14)).pvalue > 1e-3
    pairs = np.bincount((params.ops[..., 0] * 14 + params.ops[..., 1]).ravel(), minlength=14 * 14)
    assert chisquare(pairs).pvalue > 1e-3  # the slots are independent
    suite = AUTO_OPS["randaugment"]
    rotate = params.ops == [op.name for op in suite].index("rotate")
    assert set(np.abs(params.magnitudes[rotate]).round(6)) == {round(30 * 17 / 30, 6)}  # (0, 30) at bin 17 of 31
    assert set(np.sign(params.magnitudes[rotate])) == {-1.0, 1.0}


@pytest.mark.parametrize("kind", ["imagenet", "cifar", "trivial", "randaugment"])
def test_draws_depend_only_on_seed_epoch_index_and_view(kind):
    augmentation = Augmentation(kind, 32, seed=7)
    together = augmentation.draw(4, np.array([3, 11, 5]), [[40, 50]] * 3, 4)
    alone = augmentation.draw(4, np.array([11]), [[40, 50]], 6)  # another batch, more views
    for field in ("boxes", "flips", "holes", "ops", "magnitude_bins", "signs", "magnitudes"):
        assert np.array_equal(getattr(together, field)[1], getattr(alone, field)[0][:4])
    other_epoch = augmentation.draw(5, np.array([3, 11, 5]), [[40, 50]] * 3, 4)
    assert not np.array_equal(together.boxes, other_epoch.boxes)


def test_imagenet_and_cifar_draws_are_unchanged():
    """Adding the auto-augment draws left the older kinds' streams alone: digests of the draws made by
    the code before them, so earlier runs stay bit-identical."""
    expected = {"imagenet": "943d93e680a08f63", "cifar": "8c824d0451e1833f"}
    for kind, digest in expected.items():
        params = Augmentation(kind, 32, 0.08, seed=11).draw(
            2, np.array([0, 7, 123456]), [[60, 80], [300, 200], [33, 40]], 5
        )
        h = hashlib.sha256()
        for array in (params.boxes, params.flips, params.holes):
            h.update(np.ascontiguousarray(array).tobytes())
        assert h.hexdigest()[:16] == digest
        assert params.ops.shape == (3, 5, 0)


def textured(size: int = 48) -> np.ndarray:
    """An identity image with a red ramp and noise: every op, sharpness included, changes it."""
    image = np.asarray(identity_image(7, size, size)).astype(int)
    image[..., 0] = np.linspace(30, 220, size)[:, None]
    noise = np.random.default_rng(0).integers(-20, 21, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", list(AUTO_OPS))
def test_torch_and_dali_render_every_op_alike(kind):
    """Each op of the suite at bins 0, 7 and 30, both signs, through DALI's augmentations (CPU
    backend) and the torch view stage. Tolerance: mean |difference| < 1.25 levels. What differs is
    rounding (DALI rounds to nearest, v2 truncates blends: up to 1 level everywhere, 2 for
    contrast, whose grey mean v2 takes after flooring the grey image), the warps' outermost pixels
    (up to 64 levels on ~2 % of pixels) and sharpness's 1 px border (v2 keeps the input there,
    DALI filters it); equalize uses OpenCV's formula on both (0 difference). Measured worst: 1.01."""
    from nvidia.dali import fn, pipeline_def

    from dali_ba.loading.augment import magnitudes
    from dali_ba.loading.pipeline import auto_augment_view, dali_suite
    from dali_ba.loading.views import auto_augmented

    suite, image = AUTO_OPS[kind], textured()
    cases = np.array([(op, b, sign) for op in range(len(suite)) for b in (0, 7, 30) for sign in (0, 1)], dtype=np.int32)
    ops, bins, signs = (list(cases[:, i : i + 1]) for i in range(3))

    @pipeline_def(enable_conditionals=True, batch_size=len(cases), num_threads=1, device_id=None)
    def dali_ops():
        data = fn.external_source(lambda: [image] * len(cases), batch=True, layout="HWC")
        op, magnitude_bin, sign = fn.external_source(lambda: (ops, bins, signs), num_outputs=3, batch=True)
        return auto_augment_view(data, dali_suite(kind), op, magnitude_bin, sign, 1)

    pipe = dali_ops()
    pipe.build()
    (theirs,) = pipe.run()
    signed = magnitudes(suite, cases[:, :1], cases[:, 1:2], cases[:, 2:3].astype(bool))
    changed = 0
    for i, (op, b, sign) in enumerate(cases):
        ours = auto_augmented(torch.from_numpy(image).permute(2, 0, 1), suite, cases[i, :1], signed[i]).permute(1, 2, 0)
        theirs_i = np.asarray(theirs[i]).astype(float)
        difference = np.abs(ours.numpy() - theirs_i).mean()
        assert difference < 1.25, f"{suite[op].name} bin {b} sign {sign}: mean |difference| {difference:.2f}"
        changed += np.abs(theirs_i - image).mean() > 1
    assert changed >= len(cases) // 2  # not a comparison of unchanged images


def collect(batches):
    return [(x.clone(), y.clone()) for x, y in batches]


@pytest.mark.parametrize("kind", list(AUTO_OPS))
def test_the_loader_views_differ_stay_identifiable_and_match_across_stages(identity_list, kind):
    """Through BatchAugmentLoader: the M views of a sample all differ; each is its own sample's
    augmentation (it is its drawn parameters rendered on its own decoded image, far from the same
    parameters rendered on any other image of the batch: colour ops rewrite the red channel that
    names the file, so it cannot be read off the pixels; 64 px views, as a 32 px translation wipes
    a 32 px view); and DALI's graph makes the views torch makes (mean |difference| < 1.5 levels:
    resampling and the ops' rounding, as above), except views through equalize or auto_contrast:
    those stretch the identity images' near-flat red channel (JPEG noise of 1-2 levels) to the
    full range, so the resamplers' 1-level differences become tens of levels there (the ops
    themselves agree on equal inputs: test_torch_and_dali_render_every_op_alike)."""
    from dali_ba.loading.pipeline import decode_pipeline
    from dali_ba.loading.views import TorchViews

    file_list, _ = identity_list
    loader = BatchAugmentLoader(file_list, batch_size=5, views=4, view_size=64, augment=kind, num_threads=1, seed=2)
    ours, theirs = collect(loader.epoch(0, stage="torch")), collect(loader.epoch(0, stage="dali"))
    order = loader.shard(0)
    render = TorchViews(1, 5, 4, 64)
    # the whole images, decoded by the loader's decoder: the loader decodes only its views' regions
    decoder = decode_pipeline(**loader._pipeline_args(order, seed=0))
    decoder.build()
    names = [op.name for op in AUTO_OPS[kind]]
    for step, ((images, labels), (dali_images, dali_labels)) in enumerate(zip(ours, theirs)):
        assert torch.equal(labels, dali_labels)
        indices = order[step * 5 : step * 5 + 5]
        batch, _ = decoder.run()
        decoded = [np.asarray(batch[i]) for i in range(len(batch))]
        params = loader.augmentation.draw(0, indices, [d.shape[:2] for d in decoded], 4)
        stretching = np.isin(params.ops, [names.index("equalize"), names.index("auto_contrast")]).any(axis=-1)
        difference = (images.float() - dali_images.float()).abs().mean(dim=(2, 3, 4))
        assert difference[torch.from_numpy(~stretching)].mean() < 1.5
        for views in images:
            assert all(not torch.equal(views[a], views[b]) for a in range(4) for b in range(a + 1, 4))
        for b in range(5):
            # sample b's drawn views, rendered on each image of the batch in turn
            candidates = [render([decoded[source]] * 5, params)[b].permute(0, 3, 1, 2).float() for source in range(5)]
            distance = torch.stack([(images[b].float() - c).abs().mean(dim=(1, 2, 3)) for c in candidates])  # (5, M)
            others = torch.cat([distance[:b], distance[b + 1 :]])
            assert (distance[b] == 0).all() and (others > 0.1).all()


@pytest.mark.parametrize("kind", list(AUTO_OPS))
def test_the_auto_augment_graph_does_not_grow_with_m(demo_data, tmp_path, kind):
    """DALI's auto-augment graph takes a view per DALI sample, so each op is one ``select`` over all
    B·M views: the same operators at every M > 1 (a branch per view made it M × n × 14 branches),
    one decoder, fed by the source, and batches of (B, M, 3, H, W) with B labels. The views equal torch's
    (test_the_loader_views_differ_stay_identifiable_and_match_across_stages)."""
    import re

    operators = {}
    for views in (1, 3, 8):
        loader = BatchAugmentLoader(
            demo_data / "train", batch_size=4, views=views, view_size=24, augment=kind, num_threads=1, stage="dali"
        )
        pipe = loader.build_pipeline(0)
        pipe.build()
        operators[views] = len(pipe._ops)
        path = tmp_path / f"graph_{views}.dot"
        pipe.save_graph_to_dot_file(str(path))
        edges = re.findall(r"^(\S+) -> (\S+);", path.read_text(), re.M)
        decoders = {node for edge in edges for node in edge if node.startswith("__Image")}
        assert len(decoders) == 1 and next(iter(decoders)).startswith("__ImageSlice")
        images, labels = next(iter(loader.epoch(0)))
        assert images.shape == (4, views, 3, 24, 24) and labels.shape == (4,)
        assert torch.equal(labels, torch.from_numpy(np.asarray(loader.dataset.labels)[loader.shard(0)[:4]]).long())
    assert operators[1] < operators[3] == operators[8], operators  # one view per sample: no copy between slots


def test_bad_randaugment_settings():
    with pytest.raises(UsageError, match=r"randaugment_m must be in \[0, 30\], got 31"):
        Augmentation("randaugment", randaugment_m=31)
    with pytest.raises(UsageError, match=r"randaugment_n must be in \[1, 16\], got 0"):
        Augmentation("randaugment", randaugment_n=0)


@pytest.mark.parametrize(
    "augment, extra", [("trivial", []), ("randaugment", ["--randaugment-n", "1", "--randaugment-m", "12"])]
)
def test_a_training_run_with_auto_augment(demo_data, tmp_path, augment, extra):
    """The recipe keys reach every loader of a run: training, --eval-views and --calibrate-bn."""
    import json
    import sys

    from conftest import run_cli

    out = tmp_path / "run"
    done = run_cli(
        sys.executable,
        "-m",
        "dali_ba.train",
        "--recipe",
        "pipelines/demo.toml",
        "--train",
        str(demo_data / "train"),
        "--val",
        str(demo_data / "val"),
        "--output",
        str(out),
        "--augment",
        augment,
        *extra,
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "16",
        "--views",
        "2",
        "--eval-views",
        "2",
        "--calibrate-bn",
        "1",
        "--torch-threads",
        "1",
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0]
    saved = (out / "recipe.toml").read_text()
    assert f'augment = "{augment}"' in saved
    if augment == "randaugment":
        assert "randaugment_n = 1" in saved and "randaugment_m = 12" in saved
