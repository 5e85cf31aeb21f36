"""The strict device mode (dali_ba.strict_device): what it refuses and counts, and the GPU contract it
checks on real runs: a steady training step makes no host synchronisation, under both engines, in
one process and on two ranks; a --log-every step makes one read; an evaluation one per pass."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli

from dali_ba import strict_device
from dali_ba.strict_device import STANDIN, DeviceParameter, DeviceTensor, StrictDeviceError

PY = sys.executable
TRAIN = ["-m", "dali_ba.train", "--recipe", "pipelines/demo.toml"]
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
MPIRUN = ["mpirun", "--allow-run-as-root", "-np", "2", "--bind-to", "none", PY]


def in_package(code: str, **names):
    """Evaluate ``code`` as if it were a line of dali_ba (the mode refuses implicit reads there only)."""
    return eval(compile(code, str(REPO / "dali_ba" / "_strict_probe.py"), "eval"), {"torch": torch}, names)


def test_device_tensors_refuse_what_cuda_refuses():
    with strict_device.active():
        x = torch.ones(4, 3).to(STANDIN, non_blocking=True)
        assert isinstance(x, DeviceTensor) and x.device == STANDIN
        with pytest.raises(StrictDeviceError, match=r"Tensor.numpy at .*test_strict_device.py"):
            x.numpy()
        with pytest.raises(
            StrictDeviceError, match=r"Tensor.add at .* mixes a device tensor with a host tensor of shape \(4, 3\)"
        ):
            x + torch.ones(4, 3)
        with pytest.raises(StrictDeviceError, match="torch.stack"):
            torch.stack([x.sum(), torch.tensor(1.0)])  # CUDA's cat/stack take no host tensor, 0-d or not
        with pytest.raises(StrictDeviceError, match=r"float\(\) of a device tensor at dali_ba/_strict_probe.py"):
            in_package("float(x.sum())", x=x)
        for read in ("bool(x.any())", "x.sum().item()", "x.tolist()", "[int(row[0]) for row in x]", "f'{x.sum():.2f}'"):
            with pytest.raises(StrictDeviceError, match="reads it on the host"):
                in_package(read, x=x)


def test_device_tensors_accept_what_cuda_accepts():
    with strict_device.active() as log:
        x = torch.arange(6.0).reshape(2, 3).to(STANDIN, non_blocking=True)
        assert isinstance(x * 2 + torch.tensor(1.0), DeviceTensor)  # a 0-d host tensor mixes in, as on CUDA
        assert isinstance(x[torch.tensor([1, 0])], DeviceTensor)  # a host index too
        assert isinstance(torch.zeros(3, device=x.device), DeviceTensor)  # a factory on the device
        assert isinstance(torch.as_tensor(x, dtype=torch.float64), DeviceTensor)  # data already there stays there
        host = x.cpu()
        assert type(host) is torch.Tensor and host.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        assert type(x.to("cpu")) is torch.Tensor
        assert bool((x > 1).any())  # outside the package (a test's assert) an implicit read is counted, not refused
    assert [kind for kind, _ in log.events] == [".cpu()", '.to("cpu")', "bool()"]


def test_every_host_synchronisation_is_counted_with_its_site():
    with strict_device.active() as log:
        x = torch.arange(6.0).to(STANDIN)  # blocking: no non_blocking
        x.new_tensor([1.0, 2.0])
        x[x > 2]
        x.nonzero()
        torch.tensor([1.0], device=STANDIN)
        x.cpu()
        x.to(STANDIN, non_blocking=True)  # already there: nothing
        torch.ones(2).to(STANDIN, non_blocking=True)  # asynchronous: nothing
    kinds = [kind for kind, _ in log.events]
    assert kinds == [
        "blocking copy host -> device",
        "new_tensor of host data onto the device",
        "boolean-mask indexing",
        "nonzero",
        "torch.tensor of host data onto the device",
        ".cpu()",
    ]
    assert all("test_strict_device.py:" in site for _, site in log.events)


def test_a_module_moves_in_place_and_trains_on_the_device():
    with strict_device.active() as log:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
        before = list(model.parameters())
        optimizer = torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=0.9
        )  # made before the move: still its parameters
        model.to(STANDIN, memory_format=torch.channels_last)
        assert all(a is b and isinstance(a, DeviceParameter) for a, b in zip(before, model.parameters()))
        assert all(isinstance(b, DeviceTensor) for b in model.buffers())
        x = torch.rand(2, 3, 8, 8).to(STANDIN, non_blocking=True)
        steps_at = len(log.events)
        model(x).sum().backward()
        optimizer.step()
        assert len(log.events) == steps_at  # forward, backward and SGD: no host sync
        assert isinstance(model[0].weight.grad, DeviceTensor)
        with pytest.raises(StrictDeviceError, match="mixes a device tensor"):
            torch.nn.Linear(4, 2)(model(x).flatten(1)[:, :4])  # a model left on the host, fed device data


def run_training(tmp_path: Path, demo_data: Path, launcher: list[str], engine: str) -> list[dict]:
    """A strict run of 8 steps (one epoch; --log-every 4, no checkpoint within it); each process's sync report."""
    reports = tmp_path / "syncs"
    out = tmp_path / "run"
    args = [
        *TRAIN,
        "--train",
        str(demo_data / "train"),
        "--val",
        str(demo_data / "val"),
        "--output",
        str(out),
        "--engine",
        engine,
        "--batch-size",
        "8",
        "--views",
        "2",
        "--view-size",
        "32",
        "--epochs",
        "1",
        "--max-steps",
        "8",
        "--log-every",
        "4",
        "--checkpoint-every",
        "0",
        "--dali-threads",
        "1",
    ]
    done = run_cli(*launcher, *args, timeout=240, env={strict_device.ENV: str(reports)})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "parameters identical" in done.stdout
    return [json.loads(path.read_text()) for path in sorted(reports.glob("syncs-*.json"))]


@pytest.mark.parametrize(
    "launcher, engine",
    [([PY], "horovod"), ([PY], "torch"), (MPIRUN, "horovod"), (TORCHRUN, "torch")],
    ids=["one-process-horovod", "one-process-torch", "two-ranks-horovod", "two-ranks-torch"],
)
def test_a_steady_step_makes_no_host_sync(demo_data, tmp_path, launcher, engine):
    reports = run_training(tmp_path, demo_data, launcher, engine)
    assert len(reports) == (1 if launcher == [PY] else 2)
    for report in reports:
        per_step = report["per_step"]
        assert report["steps"] == 8, report
        detail = json.dumps([s for s in report["syncs"] if s["step"] >= 0], indent=1)
        # steps 2, 3, 5, 6, 7: neither the first (normalisation constants made once), a logging one, nor the last
        assert [per_step[i] for i in (1, 2, 4, 5, 6)] == [0] * 5, detail
        in_step = {s["step"]: s for s in report["syncs"]}
        assert per_step[3] == 1 and "step_times.py" in in_step[3]["site"], (
            detail
        )  # step 4 logs: the one read of its losses
        evaluation = [s for s in report["syncs"] if "evaluation.py" in s["site"]]
        assert len(evaluation) == 1, detail  # one read for the whole evaluation pass, none per batch
