"""Stage 3, the ranks: ``launcher`` reads who started this process and picks an engine; ``placement``
maps a local rank to its GPU and refuses two ranks on one unasked; ``world`` is the :class:`World`
every stage above talks to (sums, gathers, broadcasts) and its gradient averaging, as one process
runs them, with what every engine shares; ``horovod_engine`` (Horovod over MPI or Gloo) and
``torch_engine`` (torch.distributed) are the engines that average gradients over ranks; ``join``
(:func:`init_world`) joins the ranks with the engine the launcher calls for.

May import: :mod:`dali_ba.loading`, :mod:`dali_ba.data` and the base modules. Horovod and
torch.distributed are imported only by the engine that uses them. Within: ``world`` <- the engines
<- ``join``, so that no module imports one that imports it.
"""
