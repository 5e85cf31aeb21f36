"""The training run on an initialised world: resume, the epoch loop, checkpoints, the stop protocol.

:meth:`Trainer.train` is the loop, top to bottom; each concern it calls on is a method of its own:
where a run (re)starts (:meth:`Trainer.resume`), one timed step (:meth:`Trainer.train_one_step`),
the end of an epoch (validation, the epoch record), a checkpoint, a stop on a signal, the summary.
Rank 0 prints and writes <output>/recipe.toml, environment.json, metrics.jsonl and model.pt.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dali_ba.activity import ACTIVITY
from dali_ba.data.dataset import ImageDataset
from dali_ba.device import to_device
from dali_ba.errors import DivergedError, OutputFullError
from dali_ba.recipe import Recipe, recipe_to_dict
from dali_ba.training.checks import check_world
from dali_ba.training.evaluation import Validation
from dali_ba.training.metrics import MetricsLog, Progress, StepClock, StepTimes, emit
from dali_ba.training.output import writing
from dali_ba.training.step import StepOutput, gradient_norm, lr_factor, setup_training

if TYPE_CHECKING:
    import torch

    from dali_ba.distributed.world import World
    from dali_ba.training.metrics import StepRow
    from dali_ba.training.preemption import StopRequest

STOP_EVERY = 5  # steps between the ranks' agreements on a stop signal


def agree_on_stop(step: int, epoch_steps: int, last_of_epoch: bool) -> bool:
    """Whether the ranks agree on a stop signal after this step (a collective, so not after every
    step): after an epoch's (or a resumed run's) first step, its last, and every STOP_EVERY steps."""
    return epoch_steps == 1 or last_of_epoch or step % STOP_EVERY == 0


def prepare_output(output: Path, recipe: Recipe, environment: dict) -> Path:
    """Create the run folder, write the resolved recipe and the environment summary (rank 0);
    return where the metrics go."""
    import tomli_w

    output.mkdir(parents=True, exist_ok=True)
    for name, text in (("recipe.toml", tomli_w.dumps(recipe_to_dict(recipe))),
                       ("environment.json", json.dumps(environment, indent=2) + "\n")):
        with writing(output / name, output):
            (output / name).write_text(text)
    return output / "metrics.jsonl"


def run_identity(recipe: Recipe, world: World, steps_per_epoch: int) -> dict:
    """What a checkpoint must agree on to be resumed by this run."""
    d, m, o, r = recipe.data, recipe.model, recipe.optim, recipe.run
    identity = {"ranks": world.size, "arch": m.arch, "batch_size": d.batch_size, "views": d.views,
                "view_size": d.view_size, "augment": d.augment, "seed": r.seed, "regime": o.regime,
                "steps_per_epoch": steps_per_epoch}
    if d.augment == "randaugment":  # only then: checkpoints of the other augmentations lack these keys
        identity.update(randaugment_n=d.randaugment_n, randaugment_m=d.randaugment_m)
    return identity


@dataclass
class Start:
    """Where this rank's training (re)starts: an epoch, and when a checkpoint stopped mid-epoch, this
    rank's loader position in it and its epoch sums so far (loss over steps, right views, views)."""

    epoch: int = 0
    loader_state: dict | None = None
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])


class Trainer:
    """One rank's training run: ``plan`` is the recipe as run (the one the run writes is ``recipe``)."""

    log: MetricsLog  # these four from train()'s start
    times: StepTimes
    progress: Progress
    segment_start: float  # perf_counter() when this process's share of the training time started

    def __init__(self, plan: Recipe, recipe: Recipe, world: World, train_set: ImageDataset,
                 val_set: ImageDataset, stop: StopRequest) -> None:
        import torch

        check_world(plan, world, train_set, val_set)
        self.plan, self.recipe, self.world, self.stop = plan, recipe, world, stop
        self.say = emit if world.is_root else (lambda *args, **kwargs: None)
        self.training = t = setup_training(plan, world, train_set)
        self.model, self.optimizer, self.loader = t.model, t.optimizer, t.loader
        self.validation = Validation.build(plan, world, t, train_set, val_set)
        self.bad_files = self._one_record_of_bad_files()
        r, o = plan.run, plan.optim
        self.steps_per_epoch = steps = min(len(t.loader), r.max_steps) if r.max_steps else len(t.loader)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, steps, o.warmup_epochs, o.decay_epochs, o.decay_factor)
        )
        self.output = Path(r.output)
        self.identity = run_identity(plan, world, steps)
        self.step, self.trained_time = 0, 0.0  # until resume() finds a checkpoint

    def train(self) -> int:
        """The run: epochs of steps, each epoch ending in validation and a checkpoint; ranks that agree
        on a stop signal end it after the same step, with a checkpoint. Returns the exit status."""
        import torch

        d, o, r = self.plan.data, self.plan.optim, self.plan.run
        start = self.resume()
        self.log = self.open_log(start)
        self.segment_start = time.perf_counter()  # this process's share of the training time starts here
        clock, self.times = StepClock(self.training.device), StepTimes(self.world, r.timing_warmup,
                                                                      max_loss=o.max_loss if r.stop_on_divergence else None)
        self.progress = Progress(self.steps_per_epoch * o.epochs, self.step, r.log_every, self.world.is_root)
        result: dict = {}
        for epoch in range(start.epoch, o.epochs):
            self.model.train()
            resumed = start.loader_state if epoch == start.epoch else None  # mid-epoch: carry on from there
            done = resumed["batches"] if resumed else 0
            # loss over steps, right views, views: kept on the device, read at checkpoints and the epoch's end
            sums = to_device(torch.tensor(start.sums if resumed else [0.0, 0.0, 0.0], dtype=torch.float64),
                             self.training.device)
            batches = self.loader.epoch(epoch, resumed)
            epoch_start, epoch_steps = time.perf_counter(), 0
            while done < self.steps_per_epoch:
                out, samples, row, norm = self.train_one_step(batches, clock)
                done, self.step, epoch_steps = done + 1, self.step + 1, epoch_steps + 1
                ACTIVITY.step_done(self.step)
                if epoch_steps == 1:  # the stall clock runs from the end of each epoch's (or resume's) first step
                    ACTIVITY.arm()
                sums[:2] += torch.stack([out.loss.double(), out.correct.double()])
                sums[2] += samples * d.views  # a number from the host: an argument of the add, no copy
                lr = self.schedule.get_last_lr()[0]
                self.times.add(row, out.loss, epoch_steps - 1, epoch=epoch, step=self.step, lr=lr,
                               wall=round(self.wall_time(), 3), **norm)
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
        self.progress.close()
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

    def wall_time(self) -> float:
        """Seconds of training so far, over this run and the runs it resumes."""
        return self.trained_time + time.perf_counter() - self.segment_start

    # --- set-up: one record of broken files, the resume point, the metrics log -----------------------------

    def _one_record_of_bad_files(self) -> dict[str, str]:
        """One record of broken files for every loader of the run: found by any, refilled (training) or
        left out (evaluation) by all; each rank names what it finds, rank 0 lists them all."""
        d, rank, loader = self.plan.data, self.world.rank, self.loader
        bad_files = loader.bad_files
        if self.validation.calibration:  # image sizes are read once per run, whichever loader meets a file first
            self.validation.calibration.sizes = loader.sizes
        for each in [loader, *self.validation.loaders]:
            each.bad_files, each.on_bad_file = bad_files, lambda path, reason: emit(
                f"dali-ba: rank {rank}: skipping broken file {path} ({reason})", sys.stderr)
            each.max_bad_files = d.max_bad_files if d.max_bad_files >= 0 else loader.max_bad_files
            each.max_image_pixels = d.max_image_pixels
        return bad_files

    def share_bad_files(self) -> list[list[str]]:
        """Collective: every rank's broken files, merged on all ranks and listed in bad_files.txt."""
        for part in self.world.gather(dict(self.bad_files)):
            self.bad_files.update(part)
        listed = sorted([path, reason] for path, reason in self.bad_files.items())
        if self.world.is_root and listed:
            with writing(self.output / "bad_files.txt", self.output):
                (self.output / "bad_files.txt").write_text("".join(f"{path}\t{reason}\n" for path, reason in listed))
        return listed

    def resume(self) -> Start:
        """Load the checkpoint --resume names (every rank reads the same file on the shared file system,
        so nothing needs sending); without one, rank 0's initial weights go to all ranks."""
        import torch

        from dali_ba.training.checkpoint import check_compatible, find_resume_point

        t = self.training
        self.resumed_from = find_resume_point(self.plan.run.resume, self.output,
                                              warn=lambda line: self.say(line, sys.stderr))
        if not self.resumed_from:
            self.world.broadcast_from_root(self.model, self.optimizer)
            return Start()
        path, state = self.resumed_from
        check_compatible(state, path, self.identity)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if t.scaler and state["scaler"]:
            t.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        self.step, self.trained_time = state["step"], state["train_time"]
        self.bad_files.update(dict(state["bad_files"]))  # skipped before the stop: skipped the same way now
        if not state["loaders"]:
            return Start(state["epoch"])
        # Stopped mid-epoch: each rank carries on from its own loader position, sums and BatchNorm statistics.
        self.model.load_state_dict(state["rank_buffers"][self.world.rank], strict=False)
        return Start(state["epoch"], state["loaders"][self.world.rank], state["epoch_sums"][self.world.rank])

    def open_log(self, start: Start) -> MetricsLog:
        """The metrics log (rank 0 writes it, after the run folder's recipe and environment), its start
        record, and the lines that say what runs."""
        from dali_ba.training.environment import environment_summary

        d, m, o, r, world = self.plan.data, self.plan.model, self.plan.optim, self.plan.run, self.world
        device, decoder, peak_lr = self.training.device, self.loader.decoder, self.training.peak_lr
        environment = environment_summary(world, device, decoder, d.hw_decoder_load)
        log = MetricsLog(prepare_output(self.output, self.recipe, environment) if world.is_root else None,
                         append=bool(r.resume), tensorboard=self.output / "tensorboard" if r.tensorboard else None)
        log.write("start", arch=m.arch, ranks=world.size, engine=world.engine, engine_backend=world.backend,
                  engine_reason=world.reason, views=d.views, batch_size=d.batch_size, view_size=d.view_size,
                  device=device.type, decoder=decoder, epochs=o.epochs, steps_per_epoch=self.steps_per_epoch,
                  lr=peak_lr, regime=o.regime, resumed_from=self.step if self.resumed_from else None,
                  deterministic=r.deterministic, compile=m.compile)
        self.say(f"dali-ba: engine {world.engine}{f' ({world.backend})' if world.backend else ''}: {world.reason}")
        self.say(f"dali-ba: {m.arch}, {world.size} rank(s) on {device.type}, decoder {decoder}, "
                 f"B={d.batch_size} unique x M={d.views} views = {d.batch_size * d.views} images/step, "
                 f"lr {peak_lr:g}, {self.steps_per_epoch} steps/epoch, {o.epochs} epochs -> {self.output}")
        if self.resumed_from:
            self.say(f"resumed from {self.resumed_from[0]} at step {self.step} (epoch {start.epoch + 1})")
        return log

    # --- during the loop: step records, checkpoints, a stop ---------------------------------------------------

    def log_steps(self, epoch: int) -> None:
        """Collective: the buffered steps' records (gathered from every rank) to the log and progress;
        a diverged step among them stops the run (every rank sees the same losses)."""
        records = self.times.flush()
        for record in records:
            self.log.write("step", **record)
        if records:
            self.progress.update(self.step, epoch, records[-1]["loss"], self.schedule.get_last_lr()[0])
        if self.times.diverged:
            self.stop_diverged(self.times.diverged)

    def stop_diverged(self, step: dict) -> None:
        """End the run at the first diverged step: a record, one line from rank 0, DivergedError."""
        from dali_ba.training.output import last_checkpoint

        last = last_checkpoint(self.output)
        self.log.write("diverged", step=step["step"], epoch=step["epoch"], loss=step["loss"], lr=step["lr"],
                       last_checkpoint=last)
        self.progress.close()
        limit = self.plan.optim.max_loss
        raise DivergedError(
            f"training diverged at step {step['step']} (epoch {step['epoch'] + 1}): loss {step['loss']:.4g} (mean over "
            f"ranks; {'not finite' if not math.isfinite(step['loss']) else f'over --max-loss {limit:g}'}), lr "
            f"{step['lr']:.4g}; no checkpoint of its weights was written, the last good one is {last}; lower --lr or "
            "--batch-size, add --warmup-epochs, or pass --no-stop-on-divergence to train on" if self.world.is_root else "")

    def checkpoint(self, epoch: int, sums: list[float] | None) -> None:
        """Collective. ``sums`` given: stopped mid-epoch, so every rank's loader position goes in too."""
        with ACTIVITY.paused("checkpoint"):  # a checkpoint's time is not a step's: the stall clock stops
            self._checkpoint(epoch, sums)

    def _checkpoint(self, epoch: int, sums: list[float] | None) -> None:
        import torch

        from dali_ba.training.checkpoint import save_checkpoint

        world, t, full = self.world, self.training, None
        self.log_steps(epoch)  # reads the buffered losses: never a checkpoint of diverged weights
        mid_epoch = sums is not None
        broken = self.share_bad_files()
        loaders = world.gather(self.loader.state()) if mid_epoch else None
        all_sums = world.gather(sums) if mid_epoch else None
        # BatchNorm running statistics differ by rank until the epoch-end average: keep each rank's.
        buffers = world.gather({k: v.cpu() for k, v in self.model.named_buffers()}) if mid_epoch else None
        if world.is_root:
            state = {"run": self.identity, "step": self.step, "epoch": epoch,
                     "train_time": self.trained_time + (time.perf_counter() - self.segment_start),
                     "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "schedule": self.schedule.state_dict(), "scaler": t.scaler.state_dict() if t.scaler else None,
                     "rng": torch.get_rng_state(), "loaders": loaders, "epoch_sums": all_sums,
                     "rank_buffers": buffers, "bad_files": broken}
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
        self.log.write("stop", step=self.step, epoch=epoch, signal=next(name for name in heard if name),
                       signalled_ranks=[rank for rank, name in enumerate(heard) if name])
        self.progress.close()
        self.say(f"stopped by a signal after step {self.step} (epoch {epoch + 1}); checkpoint written to "
                 f"{self.output}/checkpoints; run again with --resume auto to continue", sys.stderr)
        return EXIT_RESUMABLE

    # --- after the steps: the epoch's end, the run's end ---------------------------------------------------

    def end_epoch(self, epoch: int, sums: torch.Tensor, done: int, epoch_steps: int, epoch_time: float) -> dict:
        """Collective: the epoch's training loss and top-1 over all ranks, BatchNorm statistics averaged,
        validation, the epoch record and line. Returns the validation's result."""
        d, world = self.plan.data, self.world
        loss_sum, right, seen = world.sum(sums.cpu().tolist())
        train_loss = loss_sum / (done * world.size)
        world.average_buffers(self.model)
        self.share_bad_files()  # what training found is not looked for again in validation
        result = self.validation.run(epoch)
        broken = self.share_bad_files()
        images_per_s = epoch_steps * d.batch_size / epoch_time
        self.log.write("epoch", epoch=epoch, train_loss=train_loss, train_top1=100 * right / seen, **result,
                       bad_files=len(broken), epoch_time=epoch_time, wall=self.wall_time(),
                       steps_per_s=epoch_steps / epoch_time, images_per_s=images_per_s,
                       views_per_s=images_per_s * d.views)
        extra = "".join(f"  {name} top-1 {result[f'{key}_top1']:5.1f}%" for key, name in
                        (("views", f"{d.eval_views}-view"), ("calibrated", "BN-calibrated")) if f"{key}_top1" in result)
        self.progress.write(
            f"epoch {epoch + 1:>3}/{self.plan.optim.epochs}  train loss {train_loss:.4f}  val loss "
            f"{result['val_loss']:.4f}  top-1 {result['top1']:5.1f}%  top-5 {result['top5']:5.1f}%{extra}  "
            f"{epoch_steps / epoch_time:.2f} steps/s  {images_per_s:.0f} img/s ({images_per_s * d.views:.0f} views/s)  "
            f"{epoch_time:.1f}s")
        return result

    def finish(self, result: dict) -> int:
        """Collective: every rank's parameter digest, model.pt, the summary record and lines. Returns 0
        if the parameters are identical on all ranks, else 1."""
        import torch

        from dali_ba.distributed import world as distributed
        from dali_ba.training.metrics import summary_table

        d, o, world = self.plan.data, self.plan.optim, self.world
        digests = world.gather(distributed.parameter_digest(self.model))
        identical = len(set(digests)) == 1
        if world.is_root:  # a temporary file first: a full disk leaves no half model.pt
            model_file, partial = self.output / "model.pt", self.output / ".model.pt.tmp"
            with writing(model_file, self.output, partial=partial):
                torch.save(self.model.state_dict(), partial)
                os.replace(partial, model_file)
        timing = self.times.summary(d.batch_size, d.views)
        wall_time = self.wall_time()
        summary = dict(epochs=o.epochs, steps=self.step, ranks=world.size, views=d.views, batch_size=d.batch_size,
                       top1=result.get("top1"), top5=result.get("top5"), val_loss=result.get("val_loss"),
                       **{k: v for k, v in result.items() if k.startswith(("views_", "calibrated_"))},
                       **timing, wall_time=wall_time, bad_files=len(self.bad_files), param_digests=digests,
                       params_identical=identical)
        self.log.write("summary", **summary)
        self.log.close()
        self.say(summary_table(timing, world.size))
        rate = (f"{timing['steps_per_s']:.2f} steps/s, {timing['images_per_s']:.0f} img/s "
                f"({timing['views_per_s']:.0f} views/s)" if timing.get("steady_steps") else "no steady-state timing")
        top = f"val top-1 {result['top1']:.1f}% top-5 {result['top5']:.1f}%" if result else "no epoch left to train"
        self.say(f"done: {o.epochs} epochs, {self.step} steps in {wall_time:.1f}s; {top}; {rate}; "
                 f"parameters {'identical' if identical else 'DIFFER'} on {world.size} rank(s)")
        return 0 if identical else 1
