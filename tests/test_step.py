"""The training step and LR schedule in-process (one process alone, and Horovod as a single rank).

The torch engine's chunked step runs on 2 ranks under torchrun: tests/test_engines.py."""

import copy
import importlib.util

import pytest
import torch

from dali_ba.distributed.horovod_engine import HorovodSync
from dali_ba.distributed.world import GradientSync
from dali_ba.training.lr_schedule import lr_factor
from dali_ba.training.models import create_model
from dali_ba.training.step import train_step

pytestmark = pytest.mark.strict_device  # GPU-relevant: make test's strict-device pass and the GPU check run it


# The GPU machine's image has no Horovod: there the Horovod case is skipped, the rest runs on CUDA.
# make test installs Horovod, so it runs every case.
NO_HOROVOD = pytest.mark.skipif(importlib.util.find_spec("horovod") is None, reason="Horovod is not installed")


@pytest.fixture(scope="module")
def horovod():
    import horovod.torch as hvd

    hvd.init()
    yield
    hvd.shutdown()


def one_step(model, images, labels, chunks, sync_class):
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sync = HorovodSync(model, optimizer, chunks) if sync_class is HorovodSync else sync_class(model, optimizer)
    loss = train_step(sync, images, labels, chunks=chunks)
    return loss.loss.item(), model


@pytest.mark.parametrize("sync_class", [GradientSync, pytest.param(HorovodSync, marks=NO_HOROVOD)])
def test_chunks_give_the_same_step_as_one_batch(sync_class, request):
    if sync_class is HorovodSync:
        request.getfixturevalue("horovod")  # Horovod as a single rank
    torch.manual_seed(0)
    model = create_model("resnet20", 10).eval()  # BN on running stats: samples independent of the split
    images = torch.randint(0, 256, (6, 4, 3, 32, 32), dtype=torch.uint8)  # B=6, M=4: 24 views
    labels = torch.randint(0, 10, (6,))
    loss1, after1 = one_step(model, images, labels, 1, sync_class)
    loss3, after3 = one_step(model, images, labels, 5, sync_class)  # uneven micro-batches: 5,5,5,5,4
    assert loss3 == pytest.approx(loss1, rel=1e-5)
    moved = 0.0
    for (name, p1), p3, p0 in zip(after1.named_parameters(), after3.parameters(), model.parameters()):
        torch.testing.assert_close(p3, p1, rtol=1e-4, atol=1e-6, msg=name)
        moved += (p1 - p0).abs().sum().item()
    assert moved > 0  # the step did change the weights


def test_lr_schedule_warms_up_then_decays():
    def f(step: int) -> float:
        return lr_factor(step, steps_per_epoch=10, warmup_epochs=2, decay_epochs=[5, 8], decay_factor=0.1)

    assert f(0) == pytest.approx(1 / 20) and f(9) == pytest.approx(10 / 20) and f(19) == pytest.approx(1.0)
    assert f(20) == 1.0 and f(49) == 1.0
    assert f(50) == pytest.approx(0.1) and f(80) == pytest.approx(0.01)
    assert lr_factor(0, 10, 0, [], 0.1) == 1.0
