"""dali-ba's benchmarks, one module each, run from the repository root as ``python -m benchmarks.NAME``
(benchmarks/README.md describes them; their committed results are in benchmarks/results/):

- ``peers``: dali-ba side by side with five other ways to feed B samples x M views;
- ``view_cost``: where the per-view time goes, step by step;
- ``shards``: the same JPEGs from a folder and from tar shards, warm and cold;
- ``engines``: the same training under Horovod and torch.distributed;
- ``startup``: a job's start-up at 10 k to 1.28 M files (seconds, RSS and metadata calls per rank);
- ``make_images``: the ImageNet-like benchmark JPEGs the others read;
- ``gpu_check``: the GPU check (``make gpu-check``), a package of its own.
"""
