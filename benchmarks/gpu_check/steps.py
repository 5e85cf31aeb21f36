"""The steps of the GPU check (benchmarks/gpu_check/driver.py runs them), one per process:

    python -m benchmarks.gpu_check.steps STEP --dir DIR --work WORK [--limit SECONDS] [--smoke]

Each step writes DIR/result.json as it goes (a step killed at its limit still leaves what it had)
and exits 0 only when everything it ran worked; a missed performance target is not a failure (the
driver judges targets). ``--smoke`` runs the same code on the CPU at the sizes of
:data:`benchmarks.gpu_check.context.SMOKE`. The steps live beside this module, one module per kind:

- ``steps_env``: ``env`` (machine, versions, DALI's hardware JPEG decoder), ``doctor``;
- ``steps_tests``: ``tests`` (the GPU-relevant test files, a pytest process each);
- ``steps_train``: ``demo``, ``figure5``, ``views``, ``compile`` (trainings and profiles);
- ``steps_loader``: ``loader`` (against its peers; ``hw_decoder_load``), ``augment`` (auto-augment graphs);
- ``context``: what they share (the sizes, a step's context, the ImageNet-like JPEGs).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.gpu_check.context import Ctx
from benchmarks.gpu_check.steps_env import step_doctor, step_env
from benchmarks.gpu_check.steps_loader import step_augment, step_loader
from benchmarks.gpu_check.steps_tests import step_tests
from benchmarks.gpu_check.steps_train import step_compile, step_demo, step_figure5, step_views

STEPS: dict[str, Callable[[Ctx], int]] = {
    "env": step_env,
    "doctor": step_doctor,
    "tests": step_tests,
    "demo": step_demo,
    "loader": step_loader,
    "augment": step_augment,
    "figure5": step_figure5,
    "views": step_views,
    "compile": step_compile,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check.steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=list(STEPS))
    parser.add_argument("--dir", type=Path, required=True, help="this step's folder (log, result.json, raw outputs)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder shared by the steps")
    parser.add_argument("--limit", type=float, default=600, help="seconds this step may take")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.limit - 2  # the driver's clock started first
    ctx = Ctx(args.smoke, args.dir.resolve(), args.work.resolve(), deadline)
    ctx.result.update(step=args.step, smoke=args.smoke)
    ctx.save()
    return STEPS[args.step](ctx)


if __name__ == "__main__":
    sys.exit(main())
