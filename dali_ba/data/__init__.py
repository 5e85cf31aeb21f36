"""Stage 1, data sets on disk → samples: a folder of class folders, a ``<path> <label>`` list or tar
shards, indexed once (``dataset``, ``samples``, ``shard_index``) and split over ranks (``sharding``);
the writers of shards (``shards``) and of the demo data (``synth``, ``digits``, ``cifar10``).

May import: :mod:`dali_ba.errors` only. Nothing here knows DALI, torch or the ranks.
"""
