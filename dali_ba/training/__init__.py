"""Stage 4, a training run: ``models`` (the classifiers); ``step`` (one step) and ``rank_setup`` (a
rank's set-up for it: device, loader, model, engine, AMP), ``lr_schedule`` (warm-up and step decay) and
``determinism`` (torch's kernel switches); ``trainer`` (the loop: epochs, resume, the stop protocol);
``checkpoint`` (the files) and ``checkpoint_state`` (what they hold of a running rank, built and
restored); ``bad_files`` (one record of broken files, shared among ranks); ``evaluation``; ``output``
(the run folder, a full disk); ``preemption``; ``step_clock`` (each step's phase times on a rank) and
``step_times`` (every rank's, gathered: step statistics, the divergence check, the summary);
``records`` (metrics.jsonl, TensorBoard), ``console`` (whole lines, the progress) and ``reporter``
(what rank 0 records and says of a run); ``startup`` (the start-up's phases, timed); ``checks`` (the
run's inputs before anything starts), ``environment`` (what ran where) and ``stall`` (a rank that hangs
ends the job, named).

May import: :mod:`dali_ba.recipe`, :mod:`dali_ba.distributed`, :mod:`dali_ba.loading`,
:mod:`dali_ba.data` and the base modules. The command line is :mod:`dali_ba.train`; the profiler's
step timing is :mod:`dali_ba.tools.step_timing`.
"""
