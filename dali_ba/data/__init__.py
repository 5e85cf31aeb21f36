"""Stage 1, data sets on disk → samples: a folder of class folders, a ``<path> <label>`` list or tar
shards, indexed once into files and labels (``dataset``, ``samples``; tar shards by ``shard_reader``)
and partitioned between ranks (``partition``); the writers of tar shards (``shard_writer``, the
``dali-ba shards`` command; ``shards`` keeps its old ``python -m`` name working) and of the demo data
(``synth``, ``digits``, ``cifar10``).

May import: :mod:`dali_ba.errors` only. Nothing here knows DALI, torch or the ranks.
"""
