"""Stage 4, a training run: ``models`` (the classifiers), ``step`` (one step and its set-up),
``trainer`` (the loop: epochs, resume, the stop protocol), ``evaluation``, ``checkpoint`` and
``output`` (the run folder, a full disk), ``preemption``, ``metrics`` (the step clock, records,
TensorBoard), ``step_timing`` (N steps between two synchronisations, for the profiler), ``checks``
(the run's inputs before anything starts), ``environment`` (what ran where) and ``stall`` (a rank
that hangs ends the job, named).

May import: :mod:`dali_ba.recipe`, :mod:`dali_ba.distributed`, :mod:`dali_ba.loading`,
:mod:`dali_ba.data` and the base modules. The command line is :mod:`dali_ba.train`.
"""
