"""The steps of the GPU check (benchmarks/gpu_check.py), one per process:

    python benchmarks/gpu_steps.py STEP --dir DIR --work WORK [--limit SECONDS] [--smoke]

Each step writes DIR/result.json as it goes (a step killed at its limit still leaves what it had)
and exits 0 only when everything it ran worked; a missed performance target is not a failure (the
driver judges targets). ``--smoke`` runs the same code on the CPU at the sizes of
:data:`gpu_common.SMOKE`. The steps live beside this file, one module per kind:

- ``gpu_steps_env.py``: ``env`` (machine, versions, DALI's hardware JPEG decoder), ``doctor``;
- ``gpu_steps_tests.py``: ``tests`` (the GPU-relevant test files, a pytest process each);
- ``gpu_steps_train.py``: ``demo``, ``figure5``, ``views``, ``compile`` (trainings and profiles);
- ``gpu_steps_loader.py``: ``loader`` (against its peers; ``hw_decoder_load``), ``augment`` (auto-augment graphs);
- ``gpu_common.py``: what they share (the sizes, a step's context, the ImageNet-like JPEGs).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gpu_common import FULL, SMOKE, Ctx, Sizes, ensure_images, gpu, read_json  # noqa: F401 (the steps' shared names)
from gpu_steps_env import JpgUtilisation, dali_decode_rate, hardware_decoder, nvidia_smi, step_doctor, step_env  # noqa: F401
from gpu_steps_loader import step_augment, step_loader
from gpu_steps_tests import SMOKE_FILES, SMOKE_TESTS, TESTS, read_outcomes, step_tests  # noqa: F401
from gpu_steps_train import CPU_DEMO_TOP1, step_compile, step_demo, step_figure5, step_views  # noqa: F401

STEPS: dict[str, Callable[[Ctx], int]] = {
    "env": step_env, "doctor": step_doctor, "tests": step_tests, "demo": step_demo, "loader": step_loader,
    "augment": step_augment, "figure5": step_figure5, "views": step_views, "compile": step_compile,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_steps.py", description=__doc__.split("\n\n")[0])
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
