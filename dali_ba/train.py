"""Train a classifier with Batch Augmentation: B samples per step, each seen as M augmented views.

    python -m dali_ba.train --recipe pipelines/demo.toml [--views 8 --epochs 5 ...]
    horovodrun -np 4 python -m dali_ba.train --recipe pipelines/imagenet_resnet50_ba.toml --train ... --val ...

The same command runs as one process or under horovodrun, mpirun or srun --mpi=pmix. The learning
rate follows the unique global batch B (the baseline's regime); the loss is the mean cross-entropy
over all B*M views. Rank 0 prints and writes <output>/recipe.toml, metrics.jsonl and model.pt.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from dali_ba.data.dataset import ImageDataset, load_dataset
from dali_ba.distributed import launcher_rank
from dali_ba.errors import UnreadableImageError, UsageError
from dali_ba.models import check_model_name
from dali_ba.recipe import Recipe, build_parser, recipe_to_dict, resolve

if TYPE_CHECKING:
    import torch

    from dali_ba.distributed import World

PROG = "python -m dali_ba.train"


def lr_factor(step: int, steps_per_epoch: int, warmup_epochs: float, decay_epochs: list[int], decay_factor: float) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up, then step decay at the given epochs."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return (step + 1) / (warmup_epochs * steps_per_epoch)
    return decay_factor ** sum(epoch >= e for e in decay_epochs)


def emit(line: str, stream=None) -> None:
    """Write a whole line in one call: launchers (mpirun --tag-output) tag each write separately."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


class MetricsLog:
    """JSON lines on rank 0 (one object per record, flushed at once); a no-op elsewhere."""

    def __init__(self, path: Path | None):
        self._file = open(path, "w") if path is not None else None

    def write(self, kind: str, **fields) -> None:
        if self._file:
            self._file.write(json.dumps({"kind": kind, **fields}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def check_output(output: Path) -> None:
    """Refuse an output folder that already holds a run: its metrics would be overwritten."""
    metrics = output / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size:
        raise UsageError(f"--output {output} already holds a run (metrics.jsonl); pick a new folder or remove it")


def prepare_output(output: Path, recipe: Recipe) -> Path:
    """Create the run folder, write the resolved recipe, and return where the metrics go (rank 0)."""
    import tomli_w

    output.mkdir(parents=True, exist_ok=True)
    (output / "recipe.toml").write_text(tomli_w.dumps(recipe_to_dict(recipe)))
    return output / "metrics.jsonl"


def check_datasets(recipe: Recipe) -> tuple[ImageDataset, ImageDataset]:
    """Index both splits; validation labels follow the training classes."""
    train_set = load_dataset(recipe.data.train)
    val_set = load_dataset(recipe.data.val, classes=train_set.classes)
    if max(val_set.labels) >= train_set.num_classes:
        raise UsageError(f"validation data {val_set.source} has labels >= {train_set.num_classes}, the training classes")
    return train_set, val_set


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunks: int = 1,
    memory_format: torch.memory_format | None = None,
    autocast=contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """One optimizer step on the B*M views of a batch; returns the mean loss (a tensor, no sync).

    With ``chunks`` K > 1 the views go through the model in K micro-batches whose losses are
    weighted by their share of the batch, so the summed gradient is that of the mean over all B*M
    views; ``optimizer`` must then be a Horovod optimizer built with backward_passes_per_step=K.
    """
    import torch
    import torch.nn.functional as F

    from dali_ba.loader import flatten_views, normalize

    x, y = flatten_views(images, labels)
    x = normalize(x).contiguous(memory_format=memory_format or torch.channels_last)
    optimizer.zero_grad()  # Horovod 0.28 takes no set_to_none; torch 2 sets grads to None anyway
    total = torch.zeros((), device=x.device)
    for xc, yc in zip(x.tensor_split(chunks), y.tensor_split(chunks)):
        with autocast():
            loss = F.cross_entropy(model(xc), yc, label_smoothing=label_smoothing) * (len(yc) / len(y))
        (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    if scaler:  # fp16: unscale the allreduced gradients before the step (Horovod + GradScaler recipe)
        optimizer.synchronize()
        scaler.unscale_(optimizer)
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    world: World,
    memory_format: torch.memory_format | None = None,
    autocast=contextlib.nullcontext,
) -> dict[str, float]:
    """Loss, top-1 and top-5 (top-k for k < 5 classes) over ``batches`` of every rank, exactly:
    correct counts and sample counts are summed over ranks, not averaged."""
    import torch
    import torch.nn.functional as F

    from dali_ba.loader import normalize

    memory_format = memory_format or torch.channels_last
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, samples
    with torch.no_grad():
        for images, labels in batches:
            with autocast():
                logits = model(normalize(images).contiguous(memory_format=memory_format)).float()
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            loss = F.cross_entropy(logits, labels, reduction="sum")
            sums += torch.tensor([loss.item(), hits[:, 0].sum().item(), hits.any(1).sum().item(), len(labels)],
                                 dtype=torch.float64)
    model.train(was_training)
    loss, top1, top5, count = world.sum(sums.tolist())
    return {"val_loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "val_samples": int(count)}


def run(recipe: Recipe, train_set: ImageDataset, val_set: ImageDataset) -> int:
    import torch

    from dali_ba import distributed
    from dali_ba.loader import BatchAugmentLoader, ValidationLoader
    from dali_ba.models import create_model

    d, m, o, r = recipe.data, recipe.model, recipe.optim, recipe.run
    world = distributed.init_world()
    if d.batch_size % world.size:
        raise UsageError(f"--batch-size {d.batch_size} (global) is not divisible by {world.size} ranks")
    per_rank = d.batch_size // world.size
    if per_rank * d.views < o.chunks:
        raise UsageError(f"--chunks {o.chunks} is more than the {per_rank * d.views} views per rank per step")
    for name, dataset in (("training", train_set), ("validation", val_set)):
        if len(dataset) < world.size:
            raise UsageError(f"{name} data {dataset.source} has {len(dataset)} samples but there are {world.size} ranks")

    device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if m.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a GPU; use --amp bf16 on CPU")
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(r.torch_threads or max(1, cores // world.local_size))
    torch.manual_seed(r.seed)

    loader = BatchAugmentLoader(
        train_set, per_rank, d.views, d.view_size, augment=d.augment, crop_area_min=d.crop_area_min,
        rank=world.rank, world_size=world.size, seed=r.seed, decoder=d.decoder, device=device, num_threads=d.dali_threads,
    )
    val_loader = ValidationLoader(
        val_set, d.val_batch_size or per_rank, d.val_resize, d.val_crop,
        rank=world.rank, world_size=world.size, decoder=d.decoder, device=device, num_threads=d.dali_threads,
    )
    steps_per_epoch = min(len(loader), r.max_steps) if r.max_steps else len(loader)

    memory_format = torch.channels_last if m.channels_last else torch.contiguous_format
    model = create_model(m.arch, train_set.num_classes).to(device, memory_format=memory_format)
    peak_lr = o.lr * d.batch_size / o.lr_batch  # unique images per step, never B*M
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=o.momentum, weight_decay=o.weight_decay)
    optimizer = distributed.distributed_optimizer(optimizer, model, o.chunks)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps_per_epoch, o.warmup_epochs, o.decay_epochs, o.decay_factor)
    )
    distributed.broadcast_from_root(model, optimizer)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(m.amp)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda") if m.amp == "fp16" else None

    output = Path(r.output)
    log = MetricsLog(prepare_output(output, recipe) if world.is_root else None)
    say = emit if world.is_root else (lambda *args, **kwargs: None)
    say(f"dali-ba: {m.arch}, {world.size} rank(s) on {device.type}, decoder {loader.decoder}, "
        f"B={d.batch_size} unique x M={d.views} views = {d.batch_size * d.views} images/step, "
        f"lr {peak_lr:g}, {steps_per_epoch} steps/epoch, {o.epochs} epochs -> {output}")

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step = 0
    run_start = time.perf_counter()
    train_time = 0.0
    result: dict = {}
    for epoch in range(o.epochs):
        model.train()
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        tick = time.perf_counter()
        for i, (images, labels) in enumerate(loader.epoch(epoch)):
            if i == steps_per_epoch:
                break
            data_time = time.perf_counter() - tick
            loss = train_step(model, optimizer, images, labels, chunks=o.chunks, memory_format=memory_format,
                              autocast=autocast, scaler=scaler, label_smoothing=o.label_smoothing)
            schedule.step()
            step += 1
            if step % r.log_every == 0 or i == steps_per_epoch - 1:
                sync()
                mean_loss = world.sum([loss.item()])[0] / world.size
                log.write("step", epoch=epoch, step=step, loss=mean_loss, lr=schedule.get_last_lr()[0],
                          step_time=time.perf_counter() - tick, data_time=data_time)
            loss_sum += loss
            tick = time.perf_counter()
        sync()
        epoch_time = time.perf_counter() - epoch_start
        train_time += epoch_time
        train_loss = world.sum([loss_sum.item() / steps_per_epoch])[0] / world.size
        distributed.average_buffers(model, world)
        result = evaluate(model, val_loader, world, memory_format, autocast)
        images_per_s = steps_per_epoch * d.batch_size / epoch_time
        log.write("epoch", epoch=epoch, train_loss=train_loss, **result, epoch_time=epoch_time,
                  steps_per_s=steps_per_epoch / epoch_time, images_per_s=images_per_s,
                  views_per_s=images_per_s * d.views)
        say(f"epoch {epoch + 1:>3}/{o.epochs}  train loss {train_loss:.4f}  val loss {result['val_loss']:.4f}  "
            f"top-1 {result['top1']:5.1f}%  top-5 {result['top5']:5.1f}%  {steps_per_epoch / epoch_time:.2f} steps/s  "
            f"{images_per_s:.0f} img/s ({images_per_s * d.views:.0f} views/s)  {epoch_time:.1f}s")

    digests = world.gather(distributed.parameter_digest(model))
    identical = len(set(digests)) == 1
    if world.is_root:
        torch.save(model.state_dict(), output / "model.pt")
    steps_per_s = step / train_time
    summary = dict(epochs=o.epochs, steps=step, ranks=world.size, views=d.views, batch_size=d.batch_size,
                   top1=result["top1"], top5=result["top5"], val_loss=result["val_loss"],
                   steps_per_s=steps_per_s, images_per_s=steps_per_s * d.batch_size,
                   views_per_s=steps_per_s * d.batch_size * d.views, wall_time=time.perf_counter() - run_start,
                   param_digests=digests, params_identical=identical)
    log.write("summary", **summary)
    log.close()
    say(f"done: {o.epochs} epochs, {step} steps in {summary['wall_time']:.1f}s; val top-1 {result['top1']:.1f}% "
        f"top-5 {result['top5']:.1f}%; {steps_per_s:.2f} steps/s, {summary['images_per_s']:.0f} img/s "
        f"({summary['views_per_s']:.0f} views/s); parameters {'identical' if identical else 'DIFFER'} on {world.size} rank(s)")
    return 0 if identical else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(PROG, __doc__.splitlines()[0])
    try:
        recipe = resolve(parser.parse_args(argv))
        check_model_name(recipe.model.arch)
        check_output(Path(recipe.run.output))
        train_set, val_set = check_datasets(recipe)
        return run(recipe, train_set, val_set)
    except UsageError as exc:
        # Set-up problems are the same on every rank: rank 0 speaks. A bad file is one rank's find.
        if launcher_rank() == 0 or isinstance(exc, UnreadableImageError):
            emit(f"{PROG}: error: {exc}", sys.stderr)
        else:
            time.sleep(1)  # let rank 0 report before the launcher tears the job down
        return 2
    except Exception as exc:
        if not _horovod_shut_down(exc):
            raise
        emit(f"{PROG}: rank {launcher_rank()} stopped: Horovod shut down because another rank failed "
             "(its error is above)", sys.stderr)
        return 1


def _horovod_shut_down(exc: BaseException) -> bool:
    """Whether ``exc`` is Horovod reporting that a peer rank has gone (not this rank's own fault)."""
    exceptions = sys.modules.get("horovod.common.exceptions")
    return exceptions is not None and isinstance(exc, exceptions.HorovodInternalError)


if __name__ == "__main__":
    sys.exit(main())
