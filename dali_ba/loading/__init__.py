"""Stage 2, samples → batches of B×M augmented views on the training device (README.md here: the
mental model). ``reader`` reads the bytes of each sample of a pass over data (a ``DataPass``) ahead;
``probe`` says why a file is bad; ``augment`` draws each view's parameters; ``pipeline`` is the DALI
graph (decode once; on a GPU the views too); ``views`` cuts the views on the CPU in torch; ``feed``
chooses the decoder and keeps a run's pipeline, handed one pass after another; ``recovery`` remembers
broken files, refills their slots and rebuilds a pass DALI failed on; ``loader`` holds the loaders, what
a training loop iterates; ``tensors`` flattens and normalizes the batches they yield for the model.

May import: :mod:`dali_ba.data` and the package's base modules (``errors``, ``device``,
``install_choice``, ``strict_device``). Not the ranks: a loader is told its shard.
"""
