"""What rank 0 tells of a run: its records and its console lines.

A :class:`Reporter` opens the run folder's records (``recipe.toml``, ``environment.json``,
``metrics.jsonl`` and TensorBoard) and writes and says what the trainer computed: the start, the
steps (with the progress bar or lines), each epoch, a stop on a signal or a divergence, the summary
and its timing table. On the other ranks nothing is written and nothing said. Apart from the
trainer, so that :mod:`dali_ba.training.trainer` reads as the loop it runs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dali_ba.recipe import Recipe, recipe_to_dict
from dali_ba.training.console import Progress, emit
from dali_ba.training.output import writing
from dali_ba.training.records import MetricsLog
from dali_ba.training.startup import startup_line
from dali_ba.training.step_times import summary_table

if TYPE_CHECKING:
    from dali_ba.distributed.world import World
    from dali_ba.training.checkpoint_state import Start
    from dali_ba.training.rank_setup import Training


def prepare_output(output: Path, recipe: Recipe, environment: dict) -> Path:
    """Create the run folder, write the resolved recipe and the environment summary (rank 0);
    return where the metrics go."""
    import tomli_w

    output.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("recipe.toml", tomli_w.dumps(recipe_to_dict(recipe))),
        ("environment.json", json.dumps(environment, indent=2) + "\n"),
    ):
        with writing(output / name, output):
            (output / name).write_text(text)
    return output / "metrics.jsonl"


class Reporter:
    """One rank's records and lines of a run: ``plan`` is the recipe as run, ``output`` the run folder."""

    log: MetricsLog  # from open_log()
    progress: Progress  # from open_progress()

    def __init__(self, plan: Recipe, world: World, output: Path) -> None:
        self.plan, self.world, self.output = plan, world, output
        self.say = emit if world.is_root else (lambda *args, **kwargs: None)

    def open_log(
        self,
        recipe: Recipe,
        training: Training,
        steps_per_epoch: int,
        step: int,
        resumed_from: tuple | None,
        start: Start,
        startup: dict[str, float],
    ) -> None:
        """The metrics log (rank 0 writes it, after the run folder's recipe and environment), its start
        record, and the lines that say what runs. ``startup``: the start-up's phases timed so far
        (:class:`~dali_ba.training.startup.StartupClock`'s seconds)."""
        from dali_ba.training.environment import environment_summary
        from dali_ba.training.shared_index import index_record

        d, m, o, r, world = self.plan.data, self.plan.model, self.plan.optim, self.plan.run, self.world
        device, decoder, peak_lr = training.device, training.loader.decoder, training.peak_lr
        environment = environment_summary(world, device, decoder, d.hw_decoder_load)
        log = MetricsLog(
            prepare_output(self.output, recipe, environment) if world.is_root else None,
            append=bool(r.resume),
            tensorboard=self.output / "tensorboard" if r.tensorboard else None,
        )
        log.write(
            "start",
            arch=m.arch,
            ranks=world.size,
            engine=world.engine,
            engine_backend=world.backend,
            engine_reason=world.reason,
            views=d.views,
            batch_size=d.batch_size,
            view_size=d.view_size,
            device=device.type,
            decoder=decoder,
            epochs=o.epochs,
            steps_per_epoch=steps_per_epoch,
            lr=peak_lr,
            regime=o.regime,
            resumed_from=step if resumed_from else None,
            deterministic=r.deterministic,
            compile=m.compile,
            startup_s=startup,
            index=index_record(),  # who listed the data, in how long (dali_ba.training.shared_index)
        )
        self.say(f"dali-ba: engine {world.engine}{f' ({world.backend})' if world.backend else ''}: {world.reason}")
        self.say(
            f"dali-ba: {m.arch}, {world.size} rank(s) on {device.type}, decoder {decoder}, "
            f"B={d.batch_size} unique x M={d.views} views = {d.batch_size * d.views} images/step, "
            f"lr {peak_lr:g}, {steps_per_epoch} steps/epoch, {o.epochs} epochs -> {self.output}"
        )
        if resumed_from:
            self.say(f"resumed from {resumed_from[0]} at step {step} (epoch {start.epoch + 1})")
        self.log = log

    def startup(self, step: int, seconds: dict[str, float]) -> None:
        """The start-up record and line, after this process's first step (``step``): ``seconds`` of
        each phase, the rest (``other``) and the ``total``, from the command's start to the end of that
        step (:meth:`dali_ba.training.startup.StartupClock.summary`)."""
        self.log.write("startup", step=step, startup_s=seconds)
        self.progress.write(startup_line(seconds))

    def open_progress(self, total: int, initial: int) -> None:
        """Rank 0's progress over ``total`` steps, from step ``initial``."""
        self.progress = Progress(total, initial, self.plan.run.log_every, self.world.is_root)

    def steps(self, records: list[dict], step: int, epoch: int, lr: float) -> None:
        """The buffered steps' records (gathered from every rank) to the log and progress."""
        for record in records:
            self.log.write("step", **record)
        if records:
            self.progress.update(step, epoch, records[-1]["loss"], lr)

    def diverged(self, step: dict) -> str:
        """A diverged step's record (naming the last good checkpoint), progress closed; returns the
        line of the DivergedError that ends the run (rank 0's; empty on the other ranks)."""
        from dali_ba.training.output import last_checkpoint

        last = last_checkpoint(self.output)
        self.log.write(
            "diverged", step=step["step"], epoch=step["epoch"], loss=step["loss"], lr=step["lr"], last_checkpoint=last
        )
        self.progress.close()
        limit = self.plan.optim.max_loss
        return (
            f"training diverged at step {step['step']} (epoch {step['epoch'] + 1}): loss {step['loss']:.4g} (mean over "
            f"ranks; {'not finite' if not math.isfinite(step['loss']) else f'over --max-loss {limit:g}'}), lr "
            f"{step['lr']:.4g}; no checkpoint of its weights was written, the last good one is {last}; lower --lr or "
            "--batch-size, add --warmup-epochs, or pass --no-stop-on-divergence to train on"
            if self.world.is_root
            else ""
        )

    def stopped(self, step: int, epoch: int, heard: list) -> None:
        """A stop on a signal: the stop record naming the signalled ranks (``heard``: each rank's signal,
        or None), progress closed, the line that says how to go on."""
        self.log.write(
            "stop",
            step=step,
            epoch=epoch,
            signal=next(name for name in heard if name),
            signalled_ranks=[rank for rank, name in enumerate(heard) if name],
        )
        self.progress.close()
        self.say(
            f"stopped by a signal after step {step} (epoch {epoch + 1}); checkpoint written to "
            f"{self.output}/checkpoints; run again with --resume auto to continue",
            sys.stderr,
        )

    def epoch(
        self,
        epoch: int,
        train_loss: float,
        right: float,
        seen: float,
        result: dict,
        broken: list,
        epoch_steps: int,
        epoch_time: float,
        wall: float,
    ) -> None:
        """The epoch record and line: training loss and top-1 over all ranks, ``result`` of validation."""
        d = self.plan.data
        images_per_s = epoch_steps * d.batch_size / epoch_time
        self.log.write(
            "epoch",
            epoch=epoch,
            train_loss=train_loss,
            train_top1=100 * right / seen,
            **result,
            bad_files=len(broken),
            epoch_time=epoch_time,
            wall=wall,
            steps_per_s=epoch_steps / epoch_time,
            images_per_s=images_per_s,
            views_per_s=images_per_s * d.views,
        )
        extra = "".join(
            f"  {name} top-1 {result[f'{key}_top1']:5.1f}%"
            for key, name in (("views", f"{d.eval_views}-view"), ("calibrated", "BN-calibrated"))
            if f"{key}_top1" in result
        )
        self.progress.write(
            f"epoch {epoch + 1:>3}/{self.plan.optim.epochs}  train loss {train_loss:.4f}  val loss "
            f"{result['val_loss']:.4f}  top-1 {result['top1']:5.1f}%  top-5 {result['top5']:5.1f}%{extra}  "
            f"{epoch_steps / epoch_time:.2f} steps/s  {images_per_s:.0f} img/s ({images_per_s * d.views:.0f} views/s)  "
            f"{epoch_time:.1f}s"
        )

    def summary(
        self,
        result: dict,
        timing: dict,
        steps: int,
        wall_time: float,
        bad_files: int,
        digests: list[str],
        identical: bool,
    ) -> None:
        """The summary record (the log closes), the timing table and the run's last line."""
        d, o, world = self.plan.data, self.plan.optim, self.world
        summary = dict(
            epochs=o.epochs,
            steps=steps,
            ranks=world.size,
            views=d.views,
            batch_size=d.batch_size,
            top1=result.get("top1"),
            top5=result.get("top5"),
            val_loss=result.get("val_loss"),
            **{k: v for k, v in result.items() if k.startswith(("views_", "calibrated_"))},
            **timing,
            wall_time=wall_time,
            bad_files=bad_files,
            param_digests=digests,
            params_identical=identical,
        )
        self.log.write("summary", **summary)
        self.log.close()
        self.say(summary_table(timing, world.size))
        rate = (
            f"{timing['steps_per_s']:.2f} steps/s, {timing['images_per_s']:.0f} img/s "
            f"({timing['views_per_s']:.0f} views/s)"
            if timing.get("steady_steps")
            else "no steady-state timing"
        )
        top = f"val top-1 {result['top1']:.1f}% top-5 {result['top5']:.1f}%" if result else "no epoch left to train"
        self.say(
            f"done: {o.epochs} epochs, {steps} steps in {wall_time:.1f}s; {top}; {rate}; "
            f"parameters {'identical' if identical else 'DIFFER'} on {world.size} rank(s)"
        )
