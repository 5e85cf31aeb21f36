"""Which GPU a rank trains on (node-wide view or one GPU per task) and the check that no two ranks
of a node share one unasked; CUDA is faked, so this runs on CPU."""

from types import SimpleNamespace

import pytest
import torch

from dali_ba.distributed.placement import GpuPlacement, gpu_placement, gpu_sharing_error, training_device
from dali_ba.distributed.world import World, check_gpu_sharing
from dali_ba.errors import UsageError


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as a process that sees ``visible`` GPUs, GPU i with UUID ``uuid-<i>``."""

    def see(visible: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid=f"uuid-{index}"))

    return see


@pytest.mark.parametrize(
    "visible, local_rank, expected",
    [
        (0, 3, "cpu"),  # no GPU visible
        (1, 0, "cuda:0"),
        (1, 3, "cuda:0"),  # srun --gpus-per-task=1: every task's own GPU is index 0
        (4, 2, "cuda:2"),  # node-wide view: local rank i on GPU i
        (2, 3, "cuda:1"),  # more ranks than GPUs: wraps (the sharing check then speaks)
    ],
)
def test_training_device_fits_the_visible_gpus(fake_cuda, visible, local_rank, expected):
    fake_cuda(visible)
    assert training_device(local_rank) == torch.device(expected)


def test_placement_names_the_physical_gpu(fake_cuda):
    fake_cuda(2)
    place = gpu_placement(torch.device("cuda", 1))
    assert (place.gpu_index, place.gpu_uuid, place.visible_gpus) == (1, "GPU-uuid-1", 2) and place.host
    assert gpu_placement(torch.device("cpu"))[1:] == (None, None, None)


def gpus(*ranks: tuple) -> list[GpuPlacement]:
    return [GpuPlacement(*rank) for rank in ranks]


ONE_GPU_TWO_RANKS = gpus(("n1", 0, "GPU-aaa", 1), ("n1", 0, "GPU-aaa", 1))
NODE_WIDE = gpus(("n1", 0, "GPU-aaa", 2), ("n1", 1, "GPU-bbb", 2), ("n2", 0, "GPU-ccc", 2), ("n2", 1, "GPU-ddd", 2))


@pytest.mark.parametrize(
    "placements",
    [
        gpus(("n1", 0, "GPU-aaa", 1), ("n1", 0, "GPU-bbb", 1)),  # --gpus-per-task=1: both cuda:0, two GPUs
        NODE_WIDE,  # 2 nodes x 2 GPUs, every rank sees its node's 2
        gpus(("n1", 0, "GPU-aaa", 1), ("n2", 0, "GPU-aaa", 1)),  # one UUID on two hosts: two GPUs
        gpus(("n1", None, None, None), ("n1", None, None, None)),  # CPU ranks
    ],
    ids=["per-task", "node-wide", "two-hosts", "cpu"],
)
def test_ranks_on_their_own_gpus_pass(placements):
    assert gpu_sharing_error(placements, share_gpu=False) is None


@pytest.mark.parametrize(
    "placements, names",
    [
        (ONE_GPU_TWO_RANKS, ["ranks 0 and 1 on host n1", "(cuda:0, GPU-aaa)", "they see 1 GPU:", "at most 1 rank per"]),
        (
            NODE_WIDE + gpus(("n2", 0, "GPU-ccc", 2)),  # a third rank on n2 wraps to its cuda:0
            ["ranks 2 and 4 on host n2", "(cuda:0, GPU-ccc)", "they see 2 GPUs:", "at most 2 ranks per"],
        ),
    ],
)
def test_two_ranks_on_one_gpu_is_one_line_naming_host_ranks_gpu_and_remedies(placements, names):
    error = gpu_sharing_error(placements, share_gpu=False)
    assert error is not None and "\n" not in error
    for name in [*names, "--gpus-per-task=1", "--share-gpu"]:
        assert name in error, (name, error)
    assert gpu_sharing_error(placements, share_gpu=True) is None


class GatheredWorld(World):
    """A rank of a world whose gather returns made-up placements."""

    def __init__(self, rank: int, placements: list[GpuPlacement]) -> None:
        super().__init__(rank, len(placements), rank, len(placements))
        self.placements = placements

    def gather(self, value):
        return [tuple(place) for place in self.placements]


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_raises_when_ranks_share_a_gpu_unasked(rank):
    world = GatheredWorld(rank, ONE_GPU_TWO_RANKS)
    with pytest.raises(UsageError, match="ranks 0 and 1 on host n1 would share one GPU"):
        check_gpu_sharing(world, torch.device("cpu"), share_gpu=False)
    check_gpu_sharing(world, torch.device("cpu"), share_gpu=True)


@pytest.mark.parametrize("visible, device", [(1, "cuda:0"), (2, "cuda:1")])  # not the missing cuda:1 of one GPU
def test_the_torch_engine_binds_its_rank_to_the_training_device(fake_cuda, monkeypatch, visible, device):
    from dali_ba.distributed import join as distributed
    from dali_ba.distributed.launcher import EngineChoice, Launch

    fake_cuda(visible)
    bound, made = [], []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setattr(distributed.TorchWorld, "__init__", lambda self, *args, **kwargs: made.append((args, kwargs)))
    choice = EngineChoice("torch", "test", Launch("torchrun", rank=1, size=2, local_rank=1))
    distributed.init_world(choice, share_gpu=True)
    assert bound == [torch.device(device)] and made == [((choice, "cuda"), {"share_gpu": True})]


def test_ranks_sharing_a_gpu_average_over_gloo():
    """NCCL refuses two ranks on one GPU; a world of one shows the backend (Gloo runs without a GPU)."""
    from dali_ba.distributed.launcher import EngineChoice, Launch
    from dali_ba.distributed.torch_engine import TorchWorld

    world = TorchWorld(EngineChoice("torch", "test", Launch("none")), "cuda", share_gpu=True)
    try:
        assert world.backend == "gloo"
    finally:
        world.close()


def test_environment_json_names_each_ranks_gpu(fake_cuda, monkeypatch):
    from dali_ba.training.environment import environment_summary

    fields = ("device", "gpu", "gpu_index", "gpu_uuid", "visible_gpus")
    (cpu,) = environment_summary(World(), torch.device("cpu"), "cpu")["per_rank"]
    assert [cpu[key] for key in fields] == ["cpu", None, None, None, None]
    fake_cuda(2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    (gpu,) = environment_summary(World(), torch.device("cuda", 1), "mixed")["per_rank"]
    assert [gpu[key] for key in fields] == ["cuda:1", "Fake GPU", 1, "GPU-uuid-1", 2]
    assert "cuda_visible_devices" in gpu
