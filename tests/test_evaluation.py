"""Evaluation over augmented views (--eval-views) and BatchNorm recalibration (--calibrate-bn)."""

import math

import numpy as np
import pytest
import torch
from conftest import decode_identity

from dali_ba import AugmentedValidationLoader
from dali_ba.distributed.world import World
from dali_ba.loading.tensors import normalize
from dali_ba.training.evaluation import calibrate_batchnorm, evaluate

pytestmark = pytest.mark.strict_device  # GPU-relevant: make test's strict-device pass and the GPU check run it


MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


class PixelLogits(torch.nn.Module):
    """A 'model' whose logits for a 1x1 image with pixel values p are p / 25 - 5 (normalize undone)."""

    def forward(self, x):
        pixels = (x.mean(dim=(2, 3)) * STD + MEAN) * 255
        return pixels / 25 - 5


def image_with_logits(logits):
    """The 1x1 uint8 image that PixelLogits maps to ``logits`` (each in -5..5, a multiple of 1/25)."""
    return ((torch.tensor(logits) + 5) * 25).round().to(torch.uint8).view(3, 1, 1)


def test_eval_views_average_the_softmax_over_the_views():
    # Sample 0 (label 0): one confident view for class 0, two mild ones for class 1. The mean softmax
    # picks class 0; the first view alone would too, a majority vote would not. Sample 1 (label 2):
    # its first view says class 1, the mean softmax says class 2.
    v = {
        (a, b, c): image_with_logits([a, b, c])
        for a, b, c in [(2.0, -2.0, -2.0), (-1.0, 0.0, -1.0), (-1.0, 1.0, 0.0), (-1.0, -1.0, 1.0)]
    }
    images = torch.stack(
        [
            torch.stack([v[(2.0, -2.0, -2.0)], v[(-1.0, 0.0, -1.0)], v[(-1.0, 0.0, -1.0)]]),
            torch.stack([v[(-1.0, 1.0, 0.0)], v[(-1.0, -1.0, 1.0)], v[(-1.0, -1.0, 1.0)]]),
        ]
    )
    labels = torch.tensor([0, 2])
    result = evaluate(PixelLogits(), [(images, labels)], World())
    logits = PixelLogits()(normalize(images.flatten(0, 1))).unflatten(0, (2, 3))
    mean_softmax = logits.softmax(-1).mean(1)
    assert mean_softmax.argmax(1).tolist() == [0, 2] and logits[:, 0].argmax(1).tolist() == [0, 1]
    assert result["top1"] == 100.0 and result["val_samples"] == 2
    expected_loss = -(mean_softmax[0, 0].log() + mean_softmax[1, 2].log()).item() / 2
    assert result["val_loss"] == pytest.approx(expected_loss, rel=1e-5)
    first_view_only = evaluate(PixelLogits(), [(images[:, 0], labels)], World())
    assert first_view_only["top1"] == 50.0  # what a K-view evaluation that used one view would say


@pytest.mark.parametrize("batch", [3, 8])
def test_augmented_validation_gives_every_sample_once_as_k_differing_views(identity_list, batch):
    list_file, n = identity_list
    seen = []
    for rank in range(2):
        loader = AugmentedValidationLoader(
            list_file, batch_size=batch, views=3, view_size=24, rank=rank, world_size=2, num_threads=1, seed=5
        )
        for images, labels in loader:
            assert images.shape[1:] == (3, 3, 24, 24)
            ids = decode_identity(images)  # (b, K): every view shows its own sample
            assert (ids == labels.cpu().numpy()[:, None]).all()
            assert all(not torch.equal(x[0], x[1]) for x in images)  # independent augmentations
            seen += labels.tolist()
        again = torch.cat([x.clone() for x, _ in loader])  # the same views on every pass
        first = torch.cat([x.clone() for x, _ in loader])
        assert torch.equal(again, first)
    assert sorted(seen) == list(range(n))


def test_calibrate_bn_recomputes_the_statistics_from_the_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    model[0].running_mean.fill_(42.0)
    model[0].running_var.fill_(42.0)
    model[0].momentum = 0.1
    batches = [
        (torch.randint(0, 256, (4, 2, 3, 8, 8), dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)) for _ in range(3)
    ]
    model.eval()
    seen = calibrate_batchnorm(model, batches, World())
    assert seen == 3 and not model.training and model[0].momentum == 0.1  # put back as it was
    x = torch.stack([normalize(images.flatten(0, 1)) for images, _ in batches])  # (batches, B*M, 3, 8, 8)
    per_batch_mean = x.mean(dim=(1, 3, 4))
    per_batch_var = x.var(dim=(1, 3, 4), unbiased=True)
    torch.testing.assert_close(model[0].running_mean, per_batch_mean.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[0].running_var, per_batch_var.mean(0), rtol=1e-4, atol=1e-5)
    assert int(model[0].num_batches_tracked) == 3


def test_calibrated_evaluation_leaves_training_unchanged(demo_data, tmp_path):
    """--calibrate-bn and --eval-views add numbers to the epoch record; the trained model is the same."""
    import json
    import sys

    from conftest import run_cli

    def train(out, *extra):
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
            "--batch-size",
            "16",
            "--views",
            "2",
            "--epochs",
            "2",
            "--max-steps",
            "3",
            *extra,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return done.stdout, [r for r in lines if r["kind"] == "epoch"], [r for r in lines if r["kind"] == "summary"][0]

    plain_out, plain, plain_summary = train(tmp_path / "plain")
    stdout, epochs, summary = train(tmp_path / "both", "--eval-views", "3", "--calibrate-bn", "2")
    assert "3-view top-1" in stdout and "BN-calibrated top-1" in stdout
    for record in epochs:
        for key in ("views_top1", "views_top5", "views_val_loss", "calibrated_top1", "calibrated_val_loss"):
            assert isinstance(record[key], float) and not math.isnan(record[key])
    assert summary["param_digests"] == plain_summary["param_digests"]  # training untouched
    assert [e["top1"] for e in epochs] == [e["top1"] for e in plain]
    # Recalibrated statistics change the evaluation (running averages of 6 steps are far from them).
    assert any(e["calibrated_val_loss"] != e["val_loss"] for e in epochs)
    assert np.isfinite(summary["calibrated_top1"]) and np.isfinite(summary["views_top1"])
