"""Run under torchrun with 2 ranks (tests/test_engines.py): one training step of the torch engine,
unchunked and in 3 chunks, each rank on its own batch, against one process stepping on both batches.

Rank 0 saves {"reference", "chunks1", "chunks3": parameters, "allreduces1", "allreduces3": DDP bucket
allreduces in the step} to the file named by the first argument.
"""

import copy
import sys

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dali_ba.distributed.join import init_world
from dali_ba.distributed.world import GradientSync
from dali_ba.training.models import create_model
from dali_ba.training.step import train_step

allreduces = 0
_allreduce_hook = default_hooks.allreduce_hook


def counting_hook(state, bucket):
    global allreduces
    allreduces += 1
    return _allreduce_hook(state, bucket)


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    images = torch.randint(0, 256, (6, 4, 3, 32, 32), dtype=torch.uint8, generator=generator)  # B=6, M=4
    return images, torch.randint(0, 10, (6,), generator=generator)


def stepped(model, world, images, labels, chunks):
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sync = world.gradient_sync(model, optimizer, chunks) if world else GradientSync(model, optimizer)
    train_step(sync, images, labels, chunks=chunks)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def main(out: str) -> None:
    global allreduces
    default_hooks.allreduce_hook = counting_hook  # dali-ba's hook looks the default up at each call
    world = init_world("torch")
    assert world.engine == "torch" and world.size == 2, (world.engine, world.size)
    torch.manual_seed(0)
    model = create_model("resnet20", 10).eval()  # BN on running stats: samples independent of the split
    images, labels = batch(world.rank)
    result = {}
    for chunks in (1, 3):
        allreduces = 0
        result[f"chunks{chunks}"] = stepped(model, world, images, labels, chunks)
        result[f"allreduces{chunks}"] = allreduces
    both = [batch(rank) for rank in range(world.size)]
    result["reference"] = stepped(model, None, torch.cat([b[0] for b in both]), torch.cat([b[1] for b in both]), 1)
    if world.is_root:
        torch.save(result, out)
    world.close()


if __name__ == "__main__":
    main(sys.argv[1])
