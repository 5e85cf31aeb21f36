"""Train a classifier with Batch Augmentation: B samples per step, each seen as M augmented views.

    python -m dali_ba.train --recipe pipelines/demo.toml [--views 8 --epochs 5 ...]
    horovodrun -np 4 python -m dali_ba.train --recipe pipelines/imagenet_resnet50_ba.toml --train ... --val ...

The same command runs as one process (no engine), under torchrun or plain srun (the torch engine:
DistributedDataParallel) and under horovodrun, mpirun or srun --mpi=pmix (the Horovod engine);
``--engine`` overrides the choice. The learning rate follows the unique global batch B (the baseline's
regime); the loss is the mean cross-entropy over all B*M views. Rank 0 prints and writes
<output>/recipe.toml, metrics.jsonl and model.pt.

Here: the command line and the engine's set-up. The run's parts each have a module: the checks of its
inputs (:mod:`dali_ba.training.checks`), the step (:mod:`dali_ba.training.step`), evaluation
(:mod:`dali_ba.training.evaluation`) and the training loop (:mod:`dali_ba.training.trainer`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib.util
import os
import re
import sys
import time
from pathlib import Path

from dali_ba.distributed.launcher import choose_engine, launcher_rank
from dali_ba.errors import RunStopped, UnreadableImageError, UsageError
from dali_ba.recipe import Recipe, build_parser, effective, resolve
from dali_ba.training.checks import check_output
from dali_ba.training.console import emit
from dali_ba.training.models import check_model_name, list_archs
from dali_ba.training.preemption import ignore_stop_signals
from dali_ba.training.startup import StartupClock

PROG = "python -m dali_ba.train"
EXIT_OUT_OF_MEMORY = 3  # the GPU ran out of memory: a smaller step (or --chunks, --amp) may fit


def run(recipe: Recipe, startup: StartupClock | None = None) -> int:
    """Join the ranks with the engine the launcher calls for, index the data (rank 0 lists, the others
    receive: :mod:`dali_ba.training.shared_index`), train, leave (``startup``: main's clock)."""
    from dali_ba.distributed import join as distributed
    from dali_ba.training.output import last_checkpoint
    from dali_ba.training.preemption import StopRequest
    from dali_ba.training.shared_index import shared_datasets
    from dali_ba.training.stall import StallWatch
    from dali_ba.training.trainer import Trainer

    startup = startup or StartupClock()
    stop = StopRequest()  # first: a signal during set-up stops the run after its first step
    plan = effective(recipe)
    r = plan.run
    engine = choose_engine(r.engine)
    if r.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if r.horovod_timeline:  # Horovod reads it at init; its coordinator (rank 0) writes the file
        if engine.engine != "horovod":
            raise UsageError(
                f"--horovod-timeline needs the Horovod engine; this run uses {engine.engine} ({engine.reason})"
            )
        if not Path(r.horovod_timeline).parent.is_dir():
            raise UsageError(f"--horovod-timeline {r.horovod_timeline}: its folder does not exist")
        os.environ["HOROVOD_TIMELINE"] = str(Path(r.horovod_timeline).resolve())
    with startup.phase("engine"):
        world = distributed.init_world(engine, share_gpu=r.share_gpu)
    with startup.phase("index"):
        train_set, val_set = shared_datasets(recipe, world)  # a data problem: the same UsageError on every rank
    # A rank that hangs: every rank that can still act leaves with EXIT_STALLED, naming it (training/stall.py).
    watch = StallWatch(
        world,
        r.stall_timeout,
        lambda: last_checkpoint(Path(r.output)),
        lambda line: emit(f"{PROG}: {line}", sys.stderr),
    ).start()
    # srun --kill-on-bad-exit (slurm/lib.sh) ends the job at the first rank that exits non-zero: ranks
    # that stop together (exit 1, 4, 74, 75) meet once more, after rank 0 has written and said its last.
    try:
        status = Trainer(plan, recipe, world, train_set, val_set, stop, startup).train()
    except RunStopped as stopped:
        if not stopped.every_rank:
            raise
        say_stopped(stopped)
        status = stopped.exit_code
    finally:
        watch.stop()
    world.barrier()
    ignore_stop_signals()  # the ranks have met: a peer that exits first gets the others SIGTERMed by torchrun
    world.close()  # not on another exception: a peer may be gone, and the launcher ends the job anyway
    return status


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when done, 2 on a usage error, EXIT_OUT_OF_MEMORY (3), DivergedError's 4, an
    output file system full (74), EXIT_RESUMABLE (75) on a stop signal, EXIT_STALLED (76) when a rank
    hung for --stall-timeout, 1 when a peer rank failed or the ranks' parameters differ."""
    startup = StartupClock()  # the start-up record's total runs from here to the end of the first step
    # Before hvd.init's MPI_Init: a rank killed by SIGSEGV, SIGBUS, SIGILL, SIGFPE or SIGABRT prints every
    # thread's Python stack, and Open MPI (which sets its handler only where none is set) leaves those alone:
    # its own report of a crash is one frame of libc.
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a stderr without a file descriptor
        faulthandler.is_enabled() or faulthandler.enable(all_threads=True)  # type: ignore[func-returns-value]  # enable() only when not yet enabled
    parser = build_parser(PROG, __doc__.splitlines()[0])
    parser.add_argument("--list-archs", action="store_true", help="list the models --arch takes, then exit")
    recipe = None
    try:
        args = parser.parse_args(argv)
        if args.list_archs:
            print("\n".join(list_archs()))
            return 0
        recipe = resolve(args)
        check_model_name(recipe.model.arch)
        check_output(Path(recipe.run.output), recipe.run.resume)
        return run(recipe, startup)
    except UsageError as exc:
        # Set-up problems are the same on every rank: rank 0 speaks. A bad file is one rank's find.
        ignore_stop_signals()  # leaving with 2: not killed on the way out by a launcher's SIGTERM
        rank = launcher_rank()
        if rank == 0:
            emit(f"{PROG}: error: {exc}", sys.stderr)
        elif isinstance(exc, UnreadableImageError):
            emit(f"{PROG}: rank {rank}: error: {exc}", sys.stderr)
        else:
            time.sleep(1)  # let rank 0 report before the launcher tears the job down
        return 2
    except RunStopped as exc:  # a full disk found by one rank alone
        ignore_stop_signals()
        say_stopped(exc)
        return exc.exit_code
    except Exception as exc:
        ignore_stop_signals()
        if _out_of_memory(exc) and recipe is not None:
            d = recipe.data
            emit(
                f"{PROG}: rank {launcher_rank()}: error: out of GPU memory with --batch-size {d.batch_size} (global) x "
                f"--views {d.views} of {d.view_size}x{d.view_size} px (--chunks {recipe.optim.chunks}, --amp "
                f"{recipe.model.amp}); split each step into micro-batches with a larger --chunks, use --amp bf16 "
                "(or fp16), or lower --batch-size, --views or --view-size",
                sys.stderr,
            )
            return EXIT_OUT_OF_MEMORY
        if not _peer_gone(exc):
            # Launchers need not tag output with ranks (make demo's mpirun does not): say whose it is.
            emit(f"{PROG}: rank {launcher_rank()}: unexpected error, traceback follows", sys.stderr)
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        emit(
            f"{PROG}: rank {launcher_rank()} stopped: its collectives failed because another rank failed "
            f"(its error is above): {reason[:200]}",
            sys.stderr,
        )
        return 1


def say_stopped(exc: RunStopped) -> None:
    """A full disk, a diverged loss: the rank that knows says it (the others raise it empty)."""
    if str(exc):
        emit(f"{PROG}: error: {exc}", sys.stderr)


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch running out of GPU memory."""
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


# What Gloo's TCP transport says when the other end of a pair has gone (a DDP hook re-raises it as a
# plain RuntimeError): "Read error [addr]:port: Connection reset by peer", "Connection closed by peer".
GLOO_PEER_GONE = re.compile(r"gloo/transport/.*(Connection (reset|closed) by peer|Broken pipe|Socket closed)", re.S)


def _peer_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is Horovod or torch.distributed reporting that a peer rank has gone (not this
    rank's own fault)."""
    horovod = sys.modules.get("horovod.common.exceptions")
    if horovod is not None and isinstance(exc, horovod.HorovodInternalError):
        return True
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and GLOO_PEER_GONE.search(str(exc)) is not None


if __name__ == "__main__":
    sys.exit(main())
