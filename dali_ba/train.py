"""Train a classifier with Batch Augmentation: B samples per step, each seen as M augmented views.

    python -m dali_ba.train --recipe pipelines/demo.toml [--views 8 --epochs 5 ...]
    horovodrun -np 4 python -m dali_ba.train --recipe pipelines/imagenet_resnet50_ba.toml --train ... --val ...

The same command runs as one process (no engine), under torchrun or plain srun (the torch engine:
DistributedDataParallel) and under horovodrun, mpirun or srun --mpi=pmix (the Horovod engine);
``--engine`` overrides the choice. The learning rate follows the unique global batch B (the baseline's
regime); the loss is the mean cross-entropy over all B*M views. Rank 0 prints and writes
<output>/recipe.toml, metrics.jsonl and model.pt.
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from dali_ba.data.dataset import ImageDataset, load_dataset
from dali_ba.errors import UnreadableImageError, UsageError
from dali_ba.launcher import choose_engine, launcher_rank
from dali_ba.metrics import MetricsLog, emit
from dali_ba.models import check_model_name
from dali_ba.recipe import Recipe, build_parser, effective, recipe_to_dict, resolve

if TYPE_CHECKING:
    import torch

    from dali_ba.distributed import GradientSync, World
    from dali_ba.loader import BatchAugmentLoader
    from dali_ba.metrics import StepClock
    from dali_ba.preemption import StopRequest

PROG = "python -m dali_ba.train"


def lr_factor(step: int, steps_per_epoch: int, warmup_epochs: float, decay_epochs: list[int], decay_factor: float) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up, then step decay at the given epochs."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return (step + 1) / (warmup_epochs * steps_per_epoch)
    return decay_factor ** sum(epoch >= e for e in decay_epochs)


def check_output(output: Path, resume: str) -> None:
    """Refuse an output folder that already holds a run (its metrics would be overwritten), unless
    the run is being resumed, and one that cannot be created or written (rank 0 tries both, then
    removes what it created: nothing is left behind if the run stops before it starts)."""
    metrics = output / "metrics.jsonl"
    if not resume and metrics.exists() and metrics.stat().st_size:
        raise UsageError(f"--output {output} already holds a run (metrics.jsonl); pick a new folder, remove it, "
                         "or continue it with --resume auto")
    if launcher_rank() != 0:  # one prober: on a shared file system the others' folders would race it
        return
    missing = [p for p in (output, *output.parents) if not p.exists()]
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as exc:
        raise UsageError(f"--output {output}: cannot create or write it ({exc.strerror or exc})") from None
    finally:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


EXIT_OUT_OF_MEMORY = 3  # the GPU ran out of memory: a smaller step (or --chunks, --amp) may fit
STOP_EVERY = 5  # steps between the ranks' agreements on a stop signal


def agree_on_stop(step: int, epoch_steps: int, last_of_epoch: bool) -> bool:
    """Whether the ranks agree on a stop signal after this step (a collective, so not after every
    step): after an epoch's (or a resumed run's) first step, its last, and every STOP_EVERY steps."""
    return epoch_steps == 1 or last_of_epoch or step % STOP_EVERY == 0


BATCH_COPIES = 7  # uint8 batches a rank holds at once (DALI's prefetch + the one in use) + its float copy (x4)


def check_memory(per_rank: int, views: int, view_size: int, local_ranks: int, device: torch.device | None = None) -> None:
    """Refuse a batch of views that cannot fit: B*M*S^2*3 bytes per uint8 batch, about BATCH_COPIES
    of them per rank, against the memory available on this node, and, given a GPU ``device``, against
    the GPU memory free there (one rank's; what the model itself needs comes on top)."""
    batch = per_rank * views * view_size**2 * 3
    if device is None:
        need, available, where = batch * BATCH_COPIES * local_ranks, _available_memory(), f"{local_ranks} rank(s) on this node"
        advice = "lower --view-size, --batch-size or --views, or use more nodes"
    else:
        import torch

        need, available, where = batch * BATCH_COPIES, torch.cuda.mem_get_info(device)[0], f"one rank on GPU {device}"
        advice = "lower --view-size, --batch-size or --views, or use more GPUs"
    if available is not None and need > available:
        raise UsageError(f"--view-size {view_size} with {per_rank} samples x M={views} views per rank: one batch of "
                         f"views is {_bytes(batch)} (B*M*S^2*3), about {_bytes(need)} for {where} with prefetching "
                         f"and the float copy, more than the {_bytes(available)} available; {advice}")


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} PiB"


def prepare_output(output: Path, recipe: Recipe, environment: dict) -> Path:
    """Create the run folder, write the resolved recipe and the environment summary (rank 0);
    return where the metrics go."""
    import tomli_w

    output.mkdir(parents=True, exist_ok=True)
    (output / "recipe.toml").write_text(tomli_w.dumps(recipe_to_dict(recipe)))
    (output / "environment.json").write_text(json.dumps(environment, indent=2) + "\n")
    return output / "metrics.jsonl"


def check_datasets(recipe: Recipe) -> tuple[ImageDataset, ImageDataset]:
    """Index both splits; validation labels follow the training classes."""
    train_set = load_dataset(recipe.data.train)
    val_set = load_dataset(recipe.data.val, classes=train_set.classes)
    if max(val_set.labels) >= train_set.num_classes:
        raise UsageError(f"validation data {val_set.source} has labels >= {train_set.num_classes}, the training classes")
    return train_set, val_set


def check_world(recipe: Recipe, world: World, *datasets: ImageDataset) -> int:
    """Checks that need the world size; returns the per-rank batch."""
    d, o = recipe.data, recipe.optim
    if d.batch_size % world.size:
        raise UsageError(f"--batch-size {d.batch_size} (global) is not divisible by {world.size} ranks")
    per_rank = d.batch_size // world.size
    if per_rank * d.views < o.chunks:
        raise UsageError(f"--chunks {o.chunks} is more than the {per_rank * d.views} views per rank per step")
    for dataset in datasets:
        if len(dataset) < world.size:
            raise UsageError(f"data {dataset.source} has {len(dataset)} samples but there are {world.size} ranks")
    check_memory(per_rank, d.views, d.view_size, world.local_size)
    return per_rank


class StepOutput(NamedTuple):
    loss: torch.Tensor  # mean cross-entropy over the step's B*M views (this rank), no sync
    correct: torch.Tensor  # views whose top-1 prediction was right


def train_step(
    sync: GradientSync,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunks: int = 1,
    memory_format: torch.memory_format | None = None,
    autocast=contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    label_smoothing: float = 0.0,
    phase: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext(),
) -> StepOutput:
    """One optimizer step on the B*M views of a batch, gradients averaged over ranks by ``sync``.

    With ``chunks`` K > 1 the views go through the model in K micro-batches whose losses are
    weighted by their share of the batch, so the summed gradient is that of the mean over all B*M
    views, allreduced once (``sync`` built for K chunks). ``phase`` (a
    :class:`dali_ba.metrics.StepClock`'s) times "forward_backward" and "allreduce_step".
    """
    import torch
    import torch.nn.functional as F

    from dali_ba.loader import flatten_views, normalize

    with phase("forward_backward"):
        x, y = flatten_views(images, labels)
        x = normalize(x).contiguous(memory_format=memory_format or torch.channels_last)
        sync.optimizer.zero_grad()  # Horovod 0.28 takes no set_to_none; torch 2 sets grads to None anyway
        total = torch.zeros((), device=x.device)
        correct = torch.zeros((), device=x.device, dtype=torch.int64)
        for index, (xc, yc) in enumerate(zip(x.tensor_split(chunks), y.tensor_split(chunks))):
            with sync.micro_batch(last=index == chunks - 1):
                with autocast():
                    logits = sync.model(xc)
                    loss = F.cross_entropy(logits, yc, label_smoothing=label_smoothing) * (len(yc) / len(y))
                (scaler.scale(loss) if scaler else loss).backward()
            total += loss.detach()
            correct += (logits.detach().argmax(1) == yc).sum()
    with phase("allreduce_step"):  # Horovod waits here for the allreduces the backward pass started
        sync.step(scaler)
    return StepOutput(total, correct)


def gradient_norm(model: torch.nn.Module) -> float:
    """L2 norm of all parameter gradients (after the step they hold the allreduced average)."""
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0)) if grads else 0.0


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    world: World,
    memory_format: torch.memory_format | None = None,
    autocast=contextlib.nullcontext,
) -> dict[str, float]:
    """Loss, top-1 and top-5 (top-k for k < 5 classes) over ``batches`` of every rank, exactly:
    correct counts and sample counts are summed over ranks, not averaged.

    Batches of (b, 3, H, W) images are classified as they are; batches of (b, K, 3, H, W) (K views of
    each sample) by the softmax averaged over the K views (the authors' ``--avg-out``), the loss then
    being the negative log of that average at the label."""
    import torch
    import torch.nn.functional as F

    from dali_ba.loader import normalize

    memory_format = memory_format or torch.channels_last
    was_training = model.training
    model.eval()
    sums = None  # loss sum, top-1 hits, top-5 hits, samples: on the device until the end (no sync per batch)
    with torch.no_grad():
        for images, labels in batches:
            views = images.shape[1] if images.dim() == 5 else 0
            x = images.flatten(0, 1) if views else images
            with autocast():
                logits = model(normalize(x).contiguous(memory_format=memory_format)).float()
            if views:  # log of the mean softmax over the views: a log-probability per class
                scores = logits.log_softmax(1).unflatten(0, (len(labels), views)).logsumexp(1) - math.log(views)
                loss = F.nll_loss(scores, labels, reduction="sum")
            else:
                scores = logits
                loss = F.cross_entropy(logits, labels, reduction="sum")
            hits = scores.topk(min(5, scores.shape[1]), dim=1).indices == labels[:, None]
            batch = torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(1).sum().double(),
                                 loss.new_tensor(len(labels), dtype=torch.float64)])
            sums = batch if sums is None else sums + batch
    model.train(was_training)
    loss, top1, top5, count = world.sum(sums.tolist() if sums is not None else [0.0] * 4)
    return {"val_loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "val_samples": int(count)}


def calibrate_batchnorm(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    world: World,
    memory_format: torch.memory_format | None = None,
    autocast=contextlib.nullcontext,
) -> int:
    """Recompute BatchNorm running statistics from ``batches`` of training views (the authors'
    ``--calibrate-bn``): reset, then the plain average over all batches (momentum None), averaged
    over ranks. Returns the number of batches seen on this rank."""
    import torch

    from dali_ba.loader import flatten_views, normalize

    memory_format = memory_format or torch.channels_last
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    was_training = model.training
    model.train()
    seen = 0
    with torch.no_grad():
        for images, labels in batches:
            x, _ = flatten_views(images, labels)
            with autocast():
                model(normalize(x).contiguous(memory_format=memory_format))
            seen += 1
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    world.average_buffers(model)
    return seen


@dataclass
class Training:
    """A rank's training set-up: what ``dali_ba.train`` and ``dali_ba.profile step`` both run."""

    recipe: Recipe
    device: torch.device
    per_rank: int
    torch_threads: int
    loader: BatchAugmentLoader
    model: torch.nn.Module  # the bare model: what checkpoints, evaluation and digests see
    sync: GradientSync  # the gradient averaging around it
    memory_format: torch.memory_format
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None
    peak_lr: float

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.sync.optimizer

    def step(self, images: torch.Tensor, labels: torch.Tensor, clock: StepClock | None = None) -> StepOutput:
        """One optimizer step on a batch already on ``device``, its phases timed on ``clock``."""
        o = self.recipe.optim
        out = train_step(self.sync, images, labels, chunks=o.chunks, memory_format=self.memory_format,
                         autocast=self.autocast, scaler=self.scaler, label_smoothing=o.label_smoothing,
                         **({"phase": clock.phase} if clock else {}))
        if clock:  # DDP waits for its allreduces inside backward: that wait belongs to allreduce_step
            clock.move("forward_backward", "allreduce_step", self.sync.backward_wait())
        return out


def setup_training(recipe: Recipe, world: World, train_set: ImageDataset) -> Training:
    """Device, threads, the training loader, the model and the engine's gradient averaging (weights
    not yet broadcast), AMP. The loader's tensors stay where DALI made them (CPU for the cpu decoder):
    moving them is the caller's, so that it can be timed."""
    import torch

    from dali_ba.devices import check_gpu_sharing, training_device
    from dali_ba.loader import BatchAugmentLoader
    from dali_ba.models import create_model

    d, m, o, r = recipe.data, recipe.model, recipe.optim, recipe.run
    per_rank = check_world(recipe, world, train_set)
    device = training_device(world.local_rank)  # local rank -> a GPU this process sees (or the CPU)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # views are of one fixed size: let cuDNN pick its kernels once
    check_gpu_sharing(world, device, r.share_gpu)  # collective; before DDP's first NCCL call
    if device.type == "cuda":
        check_memory(per_rank, d.views, d.view_size, world.local_size, device)
    if m.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a GPU; use --amp bf16 on CPU")
    cores = len(os.sched_getaffinity(0))
    torch_threads = r.torch_threads or max(1, cores // world.local_size)
    torch.set_num_threads(torch_threads)
    torch.manual_seed(r.seed)
    loader = BatchAugmentLoader(
        train_set, per_rank, d.views, d.view_size, **d.augmentation(),
        rank=world.rank, world_size=world.size, seed=r.seed, decoder=d.decoder, num_threads=d.dali_threads,
    )
    memory_format = torch.channels_last if m.channels_last else torch.contiguous_format
    model = create_model(m.arch, train_set.num_classes).to(device, memory_format=memory_format)
    peak_lr = o.lr * d.batch_size / o.lr_batch  # unique images per step, never B*M
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=o.momentum, weight_decay=o.weight_decay)
    sync = world.gradient_sync(model, optimizer, o.chunks)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(m.amp)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda") if m.amp == "fp16" else None
    return Training(recipe, device, per_rank, torch_threads, loader, model, sync, memory_format, autocast,
                    scaler, peak_lr)


def run_identity(recipe: Recipe, world: World, steps_per_epoch: int) -> dict:
    """What a checkpoint must agree on to be resumed by this run."""
    d, m, o, r = recipe.data, recipe.model, recipe.optim, recipe.run
    identity = {"ranks": world.size, "arch": m.arch, "batch_size": d.batch_size, "views": d.views,
                "view_size": d.view_size, "augment": d.augment, "seed": r.seed, "regime": o.regime,
                "steps_per_epoch": steps_per_epoch}
    if d.augment == "randaugment":  # only then: checkpoints of the other augmentations lack these keys
        identity.update(randaugment_n=d.randaugment_n, randaugment_m=d.randaugment_m)
    return identity


def run(recipe: Recipe, train_set: ImageDataset, val_set: ImageDataset) -> int:
    """Join the ranks with the engine the launcher calls for, train, leave."""
    from dali_ba import distributed
    from dali_ba.preemption import StopRequest

    stop = StopRequest()  # first: a signal during set-up stops the run after its first step
    plan = effective(recipe)
    r = plan.run
    engine = choose_engine(r.engine)
    if r.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if r.horovod_timeline:  # Horovod reads it at init; its coordinator (rank 0) writes the file
        if engine.engine != "horovod":
            raise UsageError(f"--horovod-timeline needs the Horovod engine; this run uses {engine.engine} "
                             f"({engine.reason})")
        if not Path(r.horovod_timeline).parent.is_dir():
            raise UsageError(f"--horovod-timeline {r.horovod_timeline}: its folder does not exist")
        os.environ["HOROVOD_TIMELINE"] = str(Path(r.horovod_timeline).resolve())
    world = distributed.init_world(engine, share_gpu=r.share_gpu)
    status = _train(plan, recipe, world, train_set, val_set, stop)
    world.close()  # not on an exception: a peer may be gone, and the launcher ends the job anyway
    return status


def _train(plan: Recipe, recipe: Recipe, world: World, train_set: ImageDataset, val_set: ImageDataset,
           stop: StopRequest) -> int:
    """The training run proper, on an initialised ``world``."""
    import torch

    from dali_ba import distributed
    from dali_ba.checkpoint import check_compatible, find_resume_point, save_checkpoint
    from dali_ba.environment import environment_summary
    from dali_ba.loader import AugmentedValidationLoader, BatchAugmentLoader, ValidationLoader
    from dali_ba.metrics import Progress, StepClock, StepTimes, summary_table
    from dali_ba.preemption import EXIT_RESUMABLE

    d, m, o, r = plan.data, plan.model, plan.optim, plan.run
    check_world(plan, world, train_set, val_set)
    say = emit if world.is_root else (lambda *args, **kwargs: None)

    t = setup_training(plan, world, train_set)
    device, loader, model, optimizer, memory_format = t.device, t.loader, t.model, t.optimizer, t.memory_format
    val_loader = ValidationLoader(
        val_set, d.val_batch_size or t.per_rank, d.val_resize, d.val_crop,
        rank=world.rank, world_size=world.size, decoder=d.decoder, device=device, num_threads=d.dali_threads,
    )
    view_loader = AugmentedValidationLoader(  # --eval-views K: the training augmentation, K views per image
        val_set, d.val_batch_size or t.per_rank, d.eval_views, d.view_size, **d.augmentation(),
        rank=world.rank, world_size=world.size, seed=r.seed, decoder=d.decoder,
        device=device, num_threads=d.dali_threads,
    ) if d.eval_views else None
    calibration_loader = BatchAugmentLoader(  # --calibrate-bn N: training batches of their own (seed + 1)
        train_set, t.per_rank, d.views, d.view_size, **d.augmentation(),
        rank=world.rank, world_size=world.size, seed=r.seed + 1, decoder=d.decoder, num_threads=d.dali_threads,
    ) if d.calibrate_bn else None

    # One record of broken files for every loader of the run: found by any, refilled (training) or
    # left out (evaluation) by all; each rank names what it finds, rank 0 lists them all.
    bad_files = loader.bad_files
    if calibration_loader:  # image sizes are read once per run, whichever loader meets a file first
        calibration_loader.sizes = loader.sizes
    for each in filter(None, (loader, val_loader, view_loader, calibration_loader)):
        each.bad_files, each.on_bad_file = bad_files, lambda path, reason: emit(
            f"dali-ba: rank {world.rank}: skipping broken file {path} ({reason})", sys.stderr)
        each.max_bad_files = d.max_bad_files if d.max_bad_files >= 0 else loader.max_bad_files

    def share_bad_files() -> list[list[str]]:
        """Collective: every rank's broken files, merged on all ranks and listed in bad_files.txt."""
        for part in world.gather(dict(bad_files)):
            bad_files.update(part)
        listed = sorted([path, reason] for path, reason in bad_files.items())
        if world.is_root and listed:
            (output / "bad_files.txt").write_text("".join(f"{path}\t{reason}\n" for path, reason in listed))
        return listed

    def validate(epoch: int) -> dict[str, float]:
        """Validation as trained; with --eval-views, also over K views; with --calibrate-bn, also after
        recomputing BatchNorm statistics (for that evaluation only: training goes on unchanged)."""
        result = evaluate(model, val_loader, world, memory_format, t.autocast)
        if view_loader:
            views = evaluate(model, view_loader, world, memory_format, t.autocast)
            result.update({f"views_{k}": v for k, v in views.items() if k != "val_samples"})
        if calibration_loader:
            kept = {k: v.clone() for k, v in model.named_buffers()}
            batches = itertools.islice(calibration_loader.epoch(epoch), min(d.calibrate_bn, len(calibration_loader)))
            calibrate_batchnorm(model, ((x.to(device), y.to(device)) for x, y in batches), world, memory_format,
                                t.autocast)
            calibrated = evaluate(model, val_loader, world, memory_format, t.autocast)
            result.update({f"calibrated_{k}": v for k, v in calibrated.items() if k != "val_samples"})
            model.load_state_dict(kept, strict=False)
        return result

    steps_per_epoch = min(len(loader), r.max_steps) if r.max_steps else len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps_per_epoch, o.warmup_epochs, o.decay_epochs, o.decay_factor)
    )
    peak_lr, scaler = t.peak_lr, t.scaler

    # Resume: every rank reads the same checkpoint (shared file system), so nothing needs sending.
    output = Path(r.output)
    identity = run_identity(plan, world, steps_per_epoch)
    step, first_epoch, loader_state, carried_sums, trained_time = 0, 0, None, [0.0, 0.0, 0.0], 0.0
    resume_point = find_resume_point(r.resume, output, warn=lambda line: say(line, sys.stderr))
    if resume_point:
        path, state = resume_point
        check_compatible(state, path, identity)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        step, first_epoch, trained_time = state["step"], state["epoch"], state["train_time"]
        bad_files.update(dict(state["bad_files"]))  # skipped before the stop: skipped the same way now
        if state["loaders"]:  # stopped mid-epoch: each rank carries on from its own loader position
            loader_state, carried_sums = state["loaders"][world.rank], state["epoch_sums"][world.rank]
            model.load_state_dict(state["rank_buffers"][world.rank], strict=False)
    else:
        world.broadcast_from_root(model, optimizer)

    environment = environment_summary(world, device, loader.decoder)
    log = MetricsLog(prepare_output(output, recipe, environment) if world.is_root else None, append=bool(r.resume),
                     tensorboard=output / "tensorboard" if r.tensorboard else None)
    log.write("start", arch=m.arch, ranks=world.size, engine=world.engine, engine_backend=world.backend,
              engine_reason=world.reason, views=d.views, batch_size=d.batch_size, view_size=d.view_size,
              device=device.type, decoder=loader.decoder, epochs=o.epochs, steps_per_epoch=steps_per_epoch,
              lr=peak_lr, regime=o.regime, resumed_from=step if resume_point else None)
    say(f"dali-ba: engine {world.engine}{f' ({world.backend})' if world.backend else ''}: {world.reason}")
    say(f"dali-ba: {m.arch}, {world.size} rank(s) on {device.type}, decoder {loader.decoder}, "
        f"B={d.batch_size} unique x M={d.views} views = {d.batch_size * d.views} images/step, "
        f"lr {peak_lr:g}, {steps_per_epoch} steps/epoch, {o.epochs} epochs -> {output}")
    if resume_point:
        say(f"resumed from {resume_point[0]} at step {step} (epoch {first_epoch + 1})")

    segment_start = time.perf_counter()  # this process's share of the training time starts here

    def checkpoint(epoch: int, sums: list[float] | None) -> None:
        """Collective. ``sums`` given: stopped mid-epoch, so every rank's loader position goes in too."""
        mid_epoch = sums is not None
        broken = share_bad_files()
        loaders = world.gather(loader.state()) if mid_epoch else None
        all_sums = world.gather(sums) if mid_epoch else None
        # BatchNorm running statistics differ by rank until the epoch-end average: keep each rank's.
        buffers = world.gather({k: v.cpu() for k, v in model.named_buffers()}) if mid_epoch else None
        if world.is_root:
            state = {"run": identity, "step": step, "epoch": epoch, "train_time": trained_time + (time.perf_counter() - segment_start),
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "scaler": scaler.state_dict() if scaler else None, "rng": torch.get_rng_state(),
                     "loaders": loaders, "epoch_sums": all_sums, "rank_buffers": buffers, "bad_files": broken}
            save_checkpoint(output, step, state, r.keep_checkpoints)

    clock = StepClock(device)
    times = StepTimes(world, r.timing_warmup)
    progress = Progress(steps_per_epoch * o.epochs, step, r.log_every, world.is_root)
    result: dict = {}
    for epoch in range(first_epoch, o.epochs):
        model.train()
        done = loader_state["batches"] if loader_state else 0
        # loss over steps, right views, views: kept on the device, read at checkpoints and the epoch's end
        sums = torch.tensor(carried_sums if loader_state else [0.0, 0.0, 0.0], dtype=torch.float64, device=device)
        batches = loader.epoch(epoch, loader_state)
        loader_state = None
        epoch_start, epoch_steps = time.perf_counter(), 0
        while done < steps_per_epoch:
            clock.begin()
            with clock.phase("data"):
                images, labels = next(batches)
            with clock.phase("h2d"):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            out = t.step(images, labels, clock)
            with clock.phase("allreduce_step"):
                schedule.step()
                norm = {"grad_norm": gradient_norm(model)} if r.log_grad_norm else {}
            row = clock.end()
            done, step, epoch_steps = done + 1, step + 1, epoch_steps + 1
            sums += torch.stack([out.loss.double(), out.correct.double(), sums.new_tensor(len(labels) * d.views)])
            lr = schedule.get_last_lr()[0]
            times.add(row, out.loss, epoch_steps - 1, epoch=epoch, step=step, lr=lr,
                      wall=round(trained_time + time.perf_counter() - segment_start, 3), **norm)
            if step % r.log_every == 0 or done == steps_per_epoch:
                records = times.flush()
                for record in records:
                    log.write("step", **record)
                if records:
                    progress.update(step, epoch, records[-1]["loss"], lr)
            if agree_on_stop(step, epoch_steps, done == steps_per_epoch) and stop.agreed(world):
                for record in times.flush():
                    log.write("step", **record)
                checkpoint(epoch, sums.tolist())
                heard = world.gather(stop.signal_name)  # which ranks were signalled, and with what
                log.write("stop", step=step, epoch=epoch, signal=next(name for name in heard if name),
                          signalled_ranks=[rank for rank, name in enumerate(heard) if name])
                progress.close()
                say(f"stopped by a signal after step {step} (epoch {epoch + 1}); checkpoint written to "
                    f"{output}/checkpoints; run again with --resume auto to continue", sys.stderr)
                return EXIT_RESUMABLE
            if r.checkpoint_every and step % r.checkpoint_every == 0 and done < steps_per_epoch:
                checkpoint(epoch, sums.tolist())
        clock.sync()
        epoch_time = time.perf_counter() - epoch_start
        loss_sum, right, seen = world.sum(sums.tolist())
        train_loss = loss_sum / (done * world.size)
        world.average_buffers(model)
        share_bad_files()  # what training found is not looked for again in validation
        result = validate(epoch)
        broken = share_bad_files()
        images_per_s = epoch_steps * d.batch_size / epoch_time
        log.write("epoch", epoch=epoch, train_loss=train_loss, train_top1=100 * right / seen, **result, bad_files=len(broken),
                  epoch_time=epoch_time, wall=trained_time + time.perf_counter() - segment_start,
                  steps_per_s=epoch_steps / epoch_time, images_per_s=images_per_s, views_per_s=images_per_s * d.views)
        extra = "".join(f"  {name} top-1 {result[f'{key}_top1']:5.1f}%" for key, name in
                        (("views", f"{d.eval_views}-view"), ("calibrated", "BN-calibrated")) if f"{key}_top1" in result)
        progress.write(f"epoch {epoch + 1:>3}/{o.epochs}  train loss {train_loss:.4f}  val loss {result['val_loss']:.4f}  "
                       f"top-1 {result['top1']:5.1f}%  top-5 {result['top5']:5.1f}%{extra}  {epoch_steps / epoch_time:.2f} steps/s  "
                       f"{images_per_s:.0f} img/s ({images_per_s * d.views:.0f} views/s)  {epoch_time:.1f}s")
        checkpoint(epoch + 1, None)
    progress.close()

    digests = world.gather(distributed.parameter_digest(model))
    identical = len(set(digests)) == 1
    if world.is_root:
        torch.save(model.state_dict(), output / "model.pt")
    timing = times.summary(d.batch_size, d.views)
    wall_time = trained_time + time.perf_counter() - segment_start
    summary = dict(epochs=o.epochs, steps=step, ranks=world.size, views=d.views, batch_size=d.batch_size,
                   top1=result.get("top1"), top5=result.get("top5"), val_loss=result.get("val_loss"),
                   **{k: v for k, v in result.items() if k.startswith(("views_", "calibrated_"))},
                   **timing, wall_time=wall_time, bad_files=len(bad_files), param_digests=digests,
                   params_identical=identical)
    log.write("summary", **summary)
    log.close()
    say(summary_table(timing, world.size))
    rate = (f"{timing['steps_per_s']:.2f} steps/s, {timing['images_per_s']:.0f} img/s "
            f"({timing['views_per_s']:.0f} views/s)" if timing.get("steady_steps") else "no steady-state timing")
    top = f"val top-1 {result['top1']:.1f}% top-5 {result['top5']:.1f}%" if result else "no epoch left to train"
    say(f"done: {o.epochs} epochs, {step} steps in {wall_time:.1f}s; {top}; {rate}; "
        f"parameters {'identical' if identical else 'DIFFER'} on {world.size} rank(s)")
    return 0 if identical else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(PROG, __doc__.splitlines()[0])
    recipe = None
    try:
        recipe = resolve(parser.parse_args(argv))
        check_model_name(recipe.model.arch)
        check_output(Path(recipe.run.output), recipe.run.resume)
        train_set, val_set = check_datasets(recipe)
        return run(recipe, train_set, val_set)
    except UsageError as exc:
        # Set-up problems are the same on every rank: rank 0 speaks. A bad file is one rank's find.
        rank = launcher_rank()
        if rank == 0:
            emit(f"{PROG}: error: {exc}", sys.stderr)
        elif isinstance(exc, UnreadableImageError):
            emit(f"{PROG}: rank {rank}: error: {exc}", sys.stderr)
        else:
            time.sleep(1)  # let rank 0 report before the launcher tears the job down
        return 2
    except Exception as exc:
        if _out_of_memory(exc) and recipe is not None:
            d = recipe.data
            emit(f"{PROG}: rank {launcher_rank()}: error: out of GPU memory with --batch-size {d.batch_size} (global) x "
                 f"--views {d.views} of {d.view_size}x{d.view_size} px (--chunks {recipe.optim.chunks}, --amp "
                 f"{recipe.model.amp}); split each step into micro-batches with a larger --chunks, use --amp bf16 "
                 "(or fp16), or lower --batch-size, --views or --view-size", sys.stderr)
            return EXIT_OUT_OF_MEMORY
        if not _peer_gone(exc):
            # Launchers need not tag output with ranks (make demo's mpirun does not): say whose it is.
            emit(f"{PROG}: rank {launcher_rank()}: unexpected error, traceback follows", sys.stderr)
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        emit(f"{PROG}: rank {launcher_rank()} stopped: its collectives failed because another rank failed "
             f"(its error is above): {reason[:200]}", sys.stderr)
        return 1


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch running out of GPU memory."""
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def _peer_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is Horovod or torch.distributed reporting that a peer rank has gone (not this
    rank's own fault)."""
    horovod = sys.modules.get("horovod.common.exceptions")
    if horovod is not None and isinstance(exc, horovod.HorovodInternalError):
        return True
    dist = sys.modules.get("torch.distributed")
    return dist is not None and isinstance(exc, getattr(dist, "DistError", ()))


if __name__ == "__main__":
    sys.exit(main())
