"""Stage 5, the tools around training: ``check_data`` (every file decoded once before a long job),
``profile`` and ``profile_views`` (where a step's time goes) with ``step_timing`` (N steps between
two synchronisations, as training runs them), ``plot`` (figures from run records),
``reproduce`` (``make paper``). Each but ``step_timing`` is a ``dali-ba <command>``.

May import: every stage below (training, distributed, loading, data), the recipe and the base
modules; nothing imports a tool but the command table (:mod:`dali_ba.__main__`).
"""
