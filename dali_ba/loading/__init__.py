"""Stage 2, samples → batches of B×M augmented views on the training device (README.md here: the
mental model). ``reader`` reads each planned sample's bytes ahead; ``probe`` says why a file is bad;
``augment`` draws each view's parameters; ``pipeline`` is the DALI graph (decode once; on a GPU the
views too); ``views`` cuts the views on the CPU in torch; ``loader`` is what a training loop iterates.

May import: :mod:`dali_ba.data` and the package's base modules (``errors``, ``device``,
``install_choice``, ``strict_device``). Not the ranks: a loader is told its shard.
"""
