"""The training run on an initialised world: resume, the epoch loop, checkpoints, the stop protocol.

:meth:`Trainer.train` is the loop, top to bottom; each concern it calls on is a method of its own:
where a run (re)starts (:meth:`Trainer.resume`), one timed step (:meth:`Trainer.train_one_step`),
the end of an epoch (validation, the epoch record), a checkpoint, a stop on a signal, the summary.
Rank 0 writes <output>/model.pt; what it records and says (recipe.toml, environment.json,
metrics.jsonl, the console) is :mod:`dali_ba.training.reporter`'s, the state a checkpoint holds
:mod:`dali_ba.training.checkpoint_state`'s, the broken files :mod:`dali_ba.training.bad_files`'.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dali_ba.activity import ACTIVITY
from dali_ba.data.dataset import ImageDataset
from dali_ba.device import to_device
from dali_ba.errors import DivergedError, OutputFullError
from dali_ba.recipe import Recipe
from dali_ba.training.bad_files import one_record_of_bad_files, share_bad_files
from dali_ba.training.checkpoint_state import Start, checkpoint_state, gather_rank_states, restore_state, run_identity
from dali_ba.training.checks import check_world
from dali_ba.training.evaluation import Validation
from dali_ba.training.lr_schedule import lr_factor
from dali_ba.training.output import writing
from dali_ba.training.rank_setup import setup_training
from dali_ba.training.reporter import Reporter
from dali_ba.training.startup import StartupClock
from dali_ba.training.step import StepOutput, gradient_norm
from dali_ba.training.step_clock import StepClock
from dali_ba.training.step_times import StepTimes

if TYPE_CHECKING:
    import torch

    from dali_ba.distributed.world import World
    from dali_ba.training.preemption import StopRequest
    from dali_ba.training.step_clock import StepRow

STOP_EVERY = 5  # steps between the ranks' agreements on a stop signal


def agree_on_stop(step: int, epoch_steps: int, last_of_epoch: bool) -> bool:
    """Whether the ranks agree on a stop signal after this step (a collective, so not after every
    step): after an epoch's (or a resumed run's) first step, its last, and every STOP_EVERY steps."""
    return epoch_steps == 1 or last_of_epoch or step % STOP_EVERY == 0


class Trainer:
    """One rank's training run: ``plan`` is the recipe as run (the one the run writes is ``recipe``)."""

    times: StepTimes  # these two from train()'s start
    segment_start: float  # perf_counter() when this process's share of the training time started

    def __init__(
        self,
        plan: Recipe,
        recipe: Recipe,
        world: World,
        train_set: ImageDataset,
        val_set: ImageDataset,
        stop: StopRequest,
        startup: StartupClock | None = None,
    ) -> None:
        import torch

        check_world(plan, world, train_set, val_set)
        self.plan, self.recipe, self.world, self.stop = plan, recipe, world, stop
        self.startup = startup or StartupClock()  # dali_ba.train's, from the command's start
        self.started = False  # until this process's first step is done: the end of its start-up
        self.training = t = setup_training(plan, world, train_set, self.startup)
        self.model, self.optimizer, self.loader = t.model, t.optimizer, t.loader
        self.validation = Validation.build(plan, world, t, train_set, val_set)
        self.bad_files = one_record_of_bad_files(plan, world, self.loader, self.validation)
        r, o = plan.run, plan.optim
        self.steps_per_epoch = steps = min(len(t.loader), r.max_steps) if r.max_steps else len(t.loader)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, steps, o.warmup_epochs, o.decay_epochs, o.decay_factor)
        )
        self.output = Path(r.output)
        self.report = Reporter(plan, world, self.output)  # rank 0's records and lines
        self.identity = run_identity(plan, world, steps, (train_set, val_set))
        self.step, self.trained_time = 0, 0.0  # until resume() finds a checkpoint

    def train(self) -> int:
        """The run: epochs of steps, each epoch ending in validation and a checkpoint; ranks that agree
        on a stop signal end it after the same step, with a checkpoint. Returns the exit status."""
        import torch

        d, o, r = self.plan.data, self.plan.optim, self.plan.run
        start = self.resume()
        self.report.open_log(
            self.recipe,
            self.training,
            self.steps_per_epoch,
            self.step,
            self.resumed_from,
            start,
            self.startup.seconds(),
        )
        self.segment_start = time.perf_counter()  # this process's share of the training time starts here
        clock, self.times = (
            StepClock(self.training.device),
            StepTimes(self.world, r.timing_warmup, max_loss=o.max_loss if r.stop_on_divergence else None),
        )
        self.report.open_progress(self.steps_per_epoch * o.epochs, self.step)
        result: dict = {}
        for epoch in range(start.epoch, o.epochs):
            self.model.train()
            resumed = start.loader_state if epoch == start.epoch else None  # mid-epoch: carry on from there
            done = resumed["batches"] if resumed else 0
            # loss over steps, right views, views: kept on the device, read at checkpoints and the epoch's end
            sums = to_device(
                torch.tensor(start.sums if resumed else [0.0, 0.0, 0.0], dtype=torch.float64), self.training.device
            )
            batches = self.loader.epoch(epoch, resumed)
            if not self.started:  # the loader builds its DALI pipeline when its first batch is asked for
                batches = self.startup.first_item("dali_graph", batches)
            epoch_start, epoch_steps = time.perf_counter(), 0
            while done < self.steps_per_epoch:
                out, samples, row, norm = (self.train_one_step if self.started else self.first_step)(batches, clock)
                done, self.step, epoch_steps = done + 1, self.step + 1, epoch_steps + 1
                ACTIVITY.step_done(self.step)
                if epoch_steps == 1:  # the stall clock runs from the end of each epoch's (or resume's) first step
                    ACTIVITY.arm()
                sums[:2] += torch.stack([out.loss.double(), out.correct.double()])
                sums[2] += samples * d.views  # a number from the host: an argument of the add, no copy
                lr = self.schedule.get_last_lr()[0]
                self.times.add(
                    row,
                    out.loss,
                    epoch_steps - 1,
                    epoch=epoch,
                    step=self.step,
                    lr=lr,
                    wall=round(self.wall_time(), 3),
                    **norm,
                )
                last = done == self.steps_per_epoch
                if self.step % r.log_every == 0 or last:
                    self.log_steps(epoch)
                if agree_on_stop(self.step, epoch_steps, last) and self.stop.agreed(self.world):
                    return self.stop_after_step(epoch, sums)
                if r.checkpoint_every and self.step % r.checkpoint_every == 0 and not last:
                    self.checkpoint(epoch, sums.cpu().tolist())
            clock.sync()
            ACTIVITY.disarm("evaluation")
            result = self.end_epoch(epoch, sums, done, epoch_steps, time.perf_counter() - epoch_start)
            self.checkpoint(epoch + 1, None)
        self.report.progress.close()
        ACTIVITY.disarm("finish")
        return self.finish(result)

    def train_one_step(self, batches: Iterator, clock: StepClock) -> tuple[StepOutput, int, StepRow, dict]:
        """One step, its phases timed on ``clock``: the next batch, its copy to the device, the
        optimizer step, the LR schedule's. Returns the step's output, its samples, its clock row and
        the gradient norm's field (with --log-grad-norm)."""
        device = self.training.device
        clock.begin()
        with clock.phase("data"):
            images, labels = next(batches)
        with clock.phase("h2d"):
            images, labels = to_device(images, device), to_device(labels, device)
        out = self.training.step(images, labels, clock)
        with clock.phase("allreduce_step"):
            self.schedule.step()
            norm = {"grad_norm": gradient_norm(self.model)} if self.plan.run.log_grad_norm else {}
        return out, len(labels), clock.end(), norm

    def first_step(self, batches: Iterator, clock: StepClock) -> tuple[StepOutput, int, StepRow, dict]:
        """This process's first step, the end of its start-up: timed to the end of its work on the
        device, then the start-up's record and line (rank 0's)."""
        with self.startup.phase("first_step"):  # less the wait for its batch: dali_graph, timed inside
            step = self.train_one_step(batches, clock)
            clock.sync()
        self.report.startup(self.step + 1, self.startup.summary())
        self.started = True
        return step

    def wall_time(self) -> float:
        """Seconds of training so far, over this run and the runs it resumes."""
        return self.trained_time + time.perf_counter() - self.segment_start

    # --- set-up: the resume point -----------------------------------------------------------------------

    def resume(self) -> Start:
        """Load the checkpoint --resume names (every rank reads the same file on the shared file system,
        so nothing needs sending); without one, rank 0's initial weights go to all ranks."""
        from dali_ba.training.checkpoint import check_compatible, find_resume_point

        self.resumed_from = find_resume_point(
            self.plan.run.resume, self.output, warn=lambda line: self.report.say(line, sys.stderr)
        )
        if not self.resumed_from:
            self.world.broadcast_from_root(self.model, self.optimizer)
            return Start()
        path, state = self.resumed_from
        check_compatible(state, path, self.identity)
        self.step, self.trained_time = state["step"], state["train_time"]
        return restore_state(state, self.training, self.schedule, self.world.rank, self.bad_files)

    # --- during the loop: step records, checkpoints, a stop ---------------------------------------------------

    def log_steps(self, epoch: int) -> None:
        """Collective: the buffered steps' records (gathered from every rank) to the log and progress;
        a diverged step among them stops the run (every rank sees the same losses)."""
        records = self.times.flush()
        self.report.steps(records, self.step, epoch, self.schedule.get_last_lr()[0])  # type: ignore[arg-type]  # the lrs are floats here
        if self.times.diverged:
            self.stop_diverged(self.times.diverged)

    def stop_diverged(self, step: dict) -> None:
        """End the run at the first diverged step: a record, one line from rank 0, DivergedError."""
        raise DivergedError(self.report.diverged(step))

    def checkpoint(self, epoch: int, sums: list[float] | None) -> None:
        """Collective. ``sums`` given: stopped mid-epoch, so every rank's loader position goes in too."""
        with ACTIVITY.paused("checkpoint"):  # a checkpoint's time is not a step's: the stall clock stops
            self._checkpoint(epoch, sums)

    def _checkpoint(self, epoch: int, sums: list[float] | None) -> None:
        from dali_ba.training.checkpoint import save_checkpoint

        world, t, full = self.world, self.training, None
        self.log_steps(epoch)  # reads the buffered losses: never a checkpoint of diverged weights
        broken = share_bad_files(world, self.bad_files, self.output)
        rank_states = gather_rank_states(world, t, sums)
        if world.is_root:
            state = checkpoint_state(
                self.identity,
                self.step,
                epoch,
                self.trained_time + (time.perf_counter() - self.segment_start),
                t,
                self.schedule,
                rank_states,
                broken,
            )
            try:
                save_checkpoint(self.output, self.step, state, self.plan.run.keep_checkpoints)
            except OutputFullError as exc:
                full = exc
        if world.sum([1.0 if full else 0.0])[0]:  # every rank stops with rank 0, none waits for it
            raise OutputFullError(str(full or ""), every_rank=True)

    def stop_after_step(self, epoch: int, sums: torch.Tensor) -> int:
        """The stop protocol, on every rank after the same step: the steps' records, a checkpoint, a
        stop record naming the signalled ranks. Returns EXIT_RESUMABLE."""
        from dali_ba.training.preemption import EXIT_RESUMABLE

        self.checkpoint(epoch, sums.cpu().tolist())
        heard = self.world.gather(self.stop.signal_name)  # which ranks were signalled, and with what
        self.report.stopped(self.step, epoch, heard)
        return EXIT_RESUMABLE

    # --- after the steps: the epoch's end, the run's end ---------------------------------------------------

    def end_epoch(self, epoch: int, sums: torch.Tensor, done: int, epoch_steps: int, epoch_time: float) -> dict:
        """Collective: the epoch's training loss and top-1 over all ranks, BatchNorm statistics averaged,
        validation, the epoch record and line. Returns the validation's result."""
        world = self.world
        loss_sum, right, seen = world.sum(sums.cpu().tolist())
        train_loss = loss_sum / (done * world.size)
        world.average_buffers(self.model)
        share_bad_files(world, self.bad_files, self.output)  # what training found is not looked for again in validation
        result = self.validation.run(epoch)
        broken = share_bad_files(world, self.bad_files, self.output)
        self.report.epoch(epoch, train_loss, right, seen, result, broken, epoch_steps, epoch_time, self.wall_time())
        return result

    def finish(self, result: dict) -> int:
        """Collective: every rank's parameter digest, model.pt, the summary record and lines. Returns 0
        if the parameters are identical on all ranks, else 1."""
        import torch

        from dali_ba.distributed import world as distributed

        d, world = self.plan.data, self.world
        digests = world.gather(distributed.parameter_digest(self.model))
        identical = len(set(digests)) == 1
        if world.is_root:  # a temporary file first: a full disk leaves no half model.pt
            model_file, partial = self.output / "model.pt", self.output / ".model.pt.tmp"
            with writing(model_file, self.output, partial=partial):
                torch.save(self.model.state_dict(), partial)
                os.replace(partial, model_file)
        timing = self.times.summary(d.batch_size, d.views)
        wall_time = self.wall_time()
        self.report.summary(result, timing, self.step, wall_time, len(self.bad_files), digests, identical)
        return 0 if identical else 1
