"""Stage 3, the ranks: ``launcher`` reads who started this process and picks an engine; ``placement``
maps a local rank to its GPU and refuses two ranks on one unasked; ``world`` is the :class:`World`
every stage above talks to (sums, gathers, broadcasts) and the engines that average gradients
(Horovod over MPI or Gloo, torch.distributed, or one process).

May import: :mod:`dali_ba.loading`, :mod:`dali_ba.data` and the base modules. Horovod and
torch.distributed are imported only by the engine that uses them.
"""
