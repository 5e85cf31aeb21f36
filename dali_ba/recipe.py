"""Recipes: named training settings as TOML data, with a command-line flag for every field.

A recipe file has four tables, [data], [model], [optim] and [run]; every key is optional and falls
back to the defaults below. ``--views 8`` overrides ``[data] views`` and so on: each field's flag is
its name with dashes. Unknown keys, wrong types and out-of-range values are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast, get_type_hints

from dali_ba.distributed.launcher import ENGINES
from dali_ba.errors import OneLineParser, UsageError
from dali_ba.loading.augment import AUGMENTATIONS, check_ranges
from dali_ba.loading.feed import DEFAULT_HW_DECODER_LOAD


def option(default: Any, help: str) -> Any:
    """A recipe field: its default and the help line its command-line flag shows."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    train: str = option(
        "data/demo/train",
        "ImageNet-style folder (class sub-folders), a '<path> <label>' .txt list, "
        "or tar shards (a folder of them, a .tar, or a,b.tar; dali-ba shards)",
    )
    val: str = option(
        "data/demo/val", "validation images: class folders (training class names), a .txt list or tar shards"
    )
    augment: str = option(
        "imagenet",
        "per-view augmentation: imagenet, cifar, or the imagenet crop then "
        "trivial (TrivialAugment Wide) or randaugment (see dali_ba.loading.augment)",
    )
    batch_size: int = option(256, "B: unique images per step across all ranks (each rank reads B / ranks)")
    views: int = option(4, "M: augmented views of every sample")
    view_size: int = option(224, "training crop side, pixels")
    crop_area_min: float = option(0.08, "smallest area fraction kept by the random resized crop")
    randaugment_n: int = option(2, "augment randaugment: ops applied to each view, in a row")
    randaugment_m: int = option(9, "augment randaugment: their magnitude bin, 0 to 30")
    val_resize: int = option(256, "validation: shorter side resized to this, then centre-cropped")
    val_crop: int = option(224, "validation: side of the centred square crop")
    val_batch_size: int = option(0, "images per rank per validation step; 0: same as the training B per rank")
    eval_views: int = option(
        0,
        "also validate on the softmax averaged over K views under the training "
        "augmentation (the authors' --avg-out); 0: off",
    )
    calibrate_bn: int = option(
        0,
        "also validate after recomputing BatchNorm statistics on N training batches, "
        "averaged over ranks (the authors' --calibrate-bn); 0: off",
    )
    dali_threads: int = option(4, "DALI CPU threads per rank (and as many torch view threads with the cpu decoder)")
    decoder: str = option("auto", "auto (GPU 'mixed' decoder when a GPU is visible), cpu, mixed")
    hw_decoder_load: float = option(
        DEFAULT_HW_DECODER_LOAD,
        "mixed decoder: the share of each batch for the GPU's "
        "hardware JPEG decoder, the rest decoded with CUDA (0 to 1; given, since DALI's "
        "own default changed between releases); the cpu decoder ignores it",
    )
    view_stage: str = option(
        "auto",
        "who makes the training views: auto (torch on the cpu decoder, DALI's operators "
        "with mixed), torch (decoding on the CPU then), or dali (the GPU path's graph, "
        "on DALI's CPU operators with the cpu decoder)",
    )
    roi_decode: bool = option(
        True,
        "decode of each training image only the region its views read, the union of its M "
        "boxes (DALI's ROI decode); --no-roi-decode: whole images",
    )
    max_image_pixels: int = option(
        89_478_485,
        "an image whose header says it has more pixels is a broken file, never "
        "decoded (default: Pillow's decompression-bomb limit, "
        "dali_ba.loading.reader.DEFAULT_MAX_IMAGE_PIXELS); 0: no limit",
    )
    max_bad_files: int = option(
        -1,
        "broken files skipped (named in the log and <output>/bad_files.txt) before the "
        "run stops with an error; -1: 1% of the training files, at least 10",
    )

    def augmentation(self) -> dict[str, Any]:
        """The view loaders' augmentation arguments (and who renders them), the same for every loader of a run."""
        return dict(
            augment=self.augment,
            crop_area_min=self.crop_area_min,
            randaugment_n=self.randaugment_n,
            randaugment_m=self.randaugment_m,
            stage=None if self.view_stage == "auto" else self.view_stage,
            roi_decode=self.roi_decode,
        )


@dataclass
class ModelConfig:
    arch: str = option(
        "resnet50",
        "the paper's CIFAR resnet20/32/44/56/110, vgg16_cifar, wrn28_10, densenet_bc_100_12; "
        "any torchvision classification model (resnet50, alexnet, vit_b_16, ...); "
        "timm:<name>; or package.module:function, called with num_classes (--list-archs)",
    )
    dropout: float = option(
        0.0, "dropout between the convolutions of wrn28_10's blocks (the WRN paper's 0.3); other models keep their own"
    )
    amp: str = option("off", "off, bf16 (CPU or GPU), fp16 (GPU only)")
    channels_last: bool = option(True, "NHWC memory format for the model and its input")
    compile: bool = option(
        False,
        "torch.compile the model for the training forward (the first steps include the "
        "compilation; checkpoints and evaluation use the uncompiled model)",
    )


@dataclass
class OptimConfig:
    epochs: int = option(90, "training epochs")
    lr: float = option(0.1, "peak learning rate per `lr_batch` unique images")
    lr_batch: int = option(256, "the batch that `lr` is for: LR = lr * B / lr_batch (B unique, never B*M)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(1e-4, "L2 weight decay, all parameters")
    decay_epochs: list[int] = option([30, 60, 80], "epochs at which the LR is multiplied by decay_factor")
    decay_factor: float = option(0.1, "LR multiplier at each decay epoch")
    warmup_epochs: float = option(0.0, "linear warm-up from 0, in epochs")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    chunks: int = option(1, "split the B*M views into this many micro-batches, one optimizer step")
    max_loss: float = option(
        100.0,
        "a step whose mean loss over ranks is not finite or above this has diverged "
        "(cross-entropy at chance is ln(classes), 6.9 for ImageNet): the run stops "
        "there (see stop_on_divergence); 0: only a non-finite loss",
    )
    regime: str = option(
        "ba",
        "ba: B unique x M views per step; ra (regime adaptation, the paper's Figure 4): "
        "B*M unique samples x 1 view per step, M x the epochs, decays and warm-up",
    )


@dataclass
class RunConfig:
    output: str = option("runs/default", "metrics.jsonl, recipe.toml and the final model land here")
    seed: int = option(0, "seed of the shuffles, the augmentations and the initial weights")
    deterministic: bool = option(
        False,
        "deterministic GPU kernels: cuDNN benchmark off and deterministic, "
        "torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8 "
        "(slower; an op without a deterministic kernel raises)",
    )
    log_every: int = option(10, "steps between step records")
    max_steps: int = option(0, "stop each epoch after this many steps (0: full epochs); for smoke runs")
    torch_threads: int = option(0, "torch CPU threads per rank (0: cores / local ranks)")
    timing_warmup: int = option(5, "first steps of every epoch left out of the timing summary (pipeline start-up)")
    log_grad_norm: bool = option(False, "record the L2 norm of the allreduced gradient in every step record")
    engine: str = option(
        "auto",
        "gradient averaging: auto (torchrun or plain srun: torch; horovodrun, mpirun or "
        "srun --mpi=pmix: Horovod; one process: none), horovod, torch",
    )
    share_gpu: bool = option(False, "let several ranks of a node use one GPU (slow; for tests and debugging)")
    horovod_timeline: str = option("", "write Horovod's timeline (chrome://tracing JSON) to this file")
    tensorboard: bool = option(
        False, "also write the step and epoch records as TensorBoard scalars to <output>/tensorboard (rank 0)"
    )
    checkpoint_every: int = option(0, "steps between checkpoints (0: only at epoch ends)")
    keep_checkpoints: int = option(3, "newest checkpoints kept in <output>/checkpoints")
    resume: str = option(
        "", "'auto': newest loadable checkpoint in --output (none: start afresh); or a checkpoint file"
    )
    stop_on_divergence: bool = option(
        True,
        "stop at the first diverged step (see max_loss), writing no checkpoint of "
        "its weights; --no-stop-on-divergence trains on whatever the loss",
    )
    stall_timeout: float = option(
        120.0,
        "seconds without a finished step on some rank (from the end of each epoch's "
        "first step; evaluation and checkpoints not counted), or a sample read that "
        "has not returned, before every rank ends the job naming the stalled rank "
        "(exit 76); 0: never",
    )


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> Recipe:
        """Range checks that need no data or GPU; raises UsageError naming the field."""
        d, m, o, r = self.data, self.model, self.optim, self.run
        for part in (d, m, o, r):  # NaN passes every comparison below: a NaN learning rate trained NaN weights
            for key, kind in _fields(type(part)).items():
                if kind is float and not math.isfinite(getattr(part, key)):
                    raise UsageError(f"{_key(part, key)} must be a finite number, got {getattr(part, key)}")
        at_least = [
            (d, "batch_size", 1),
            (d, "views", 1),
            (d, "view_size", 1),
            (d, "val_resize", 1),
            (d, "val_crop", 1),
            (d, "dali_threads", 1),
            (d, "val_batch_size", 0),
            (d, "eval_views", 0),
            (d, "calibrate_bn", 0),
            (d, "max_bad_files", -1),
            (d, "max_image_pixels", 0),
            (o, "epochs", 1),
            (o, "lr_batch", 1),
            (o, "chunks", 1),
            (r, "log_every", 1),
            (r, "max_steps", 0),
            (r, "torch_threads", 0),
            (r, "timing_warmup", 0),
            (r, "checkpoint_every", 0),
            (r, "keep_checkpoints", 1),
        ]
        for section, name, low in at_least:
            if getattr(section, name) < low:
                raise UsageError(f"{_key(section, name)} must be >= {low}, got {getattr(section, name)}")
        for section, name in [
            (r, "stall_timeout"),
            (m, "dropout"),
            (o, "lr"),
            (o, "momentum"),
            (o, "weight_decay"),
            (o, "warmup_epochs"),
            (o, "max_loss"),
            (o, "label_smoothing"),
            (o, "decay_factor"),
        ]:
            if getattr(section, name) < 0:
                raise UsageError(f"{_key(section, name)} must be >= 0, got {getattr(section, name)}")
        if d.augment not in AUGMENTATIONS:
            raise UsageError(f"{_key(d, 'augment')} must be one of {', '.join(AUGMENTATIONS)}, got {d.augment!r}")
        check_ranges(d.crop_area_min, d.randaugment_n, d.randaugment_m, name=lambda field: _key(d, field))
        if d.val_resize < d.val_crop:
            raise UsageError(f"{_key(d, 'val_resize')} ({d.val_resize}) must be >= --val-crop ({d.val_crop})")
        if d.decoder not in ("auto", "cpu", "mixed"):
            raise UsageError(f"{_key(d, 'decoder')} must be auto, cpu or mixed, got {d.decoder!r}")
        if not 0 <= d.hw_decoder_load <= 1:
            raise UsageError(f"{_key(d, 'hw_decoder_load')} must be between 0 and 1, got {d.hw_decoder_load}")
        if d.view_stage not in ("auto", "torch", "dali"):
            raise UsageError(f"{_key(d, 'view_stage')} must be auto, torch or dali, got {d.view_stage!r}")
        if m.dropout >= 1:
            raise UsageError(f"{_key(m, 'dropout')} must be below 1, got {m.dropout}")
        if m.amp not in ("off", "bf16", "fp16"):
            raise UsageError(f"{_key(m, 'amp')} must be off, bf16 or fp16, got {m.amp!r}")
        if r.engine not in ENGINES:
            raise UsageError(
                f"{_key(r, 'engine')} must be {', '.join(ENGINES[:-1])} or {ENGINES[-1]}, got {r.engine!r}"
            )
        if o.regime not in ("ba", "ra"):
            raise UsageError(f"{_key(o, 'regime')} must be ba or ra, got {o.regime!r}")
        if d.batch_size * d.views < o.chunks:
            raise UsageError(f"--chunks {o.chunks} is more than the B*M = {d.batch_size * d.views} views per step")
        return self


SECTIONS = {f.name: cast(type[Any], f.default_factory) for f in dataclasses.fields(Recipe)}  # each section's class
_SECTION_OF = {cls: name for name, cls in SECTIONS.items()}


def _key(section: Any, name: str) -> str:
    return f"--{name.replace('_', '-')} ([{_SECTION_OF[type(section)]}] {name})"


def _fields(section_cls: type[Any]) -> dict[str, type]:
    return get_type_hints(section_cls)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Check a TOML value against a field type (ints are accepted for floats, bools never for numbers)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind == list[int]:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        raise UsageError(f"{where} must be a list of integers, got {value!r}")
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise UsageError(f"{where} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


# Named recipes: pipelines/ beside the package in a source checkout, dali_ba/pipelines/ when installed.
RECIPE_FOLDERS = (Path(__file__).resolve().parent / "pipelines", Path(__file__).resolve().parents[1] / "pipelines")


def recipe_names() -> list[str]:
    return sorted({p.stem for folder in RECIPE_FOLDERS if folder.is_dir() for p in folder.glob("*.toml")})


def find_recipe(name: str | Path) -> Path:
    """A recipe file: ``name`` itself when it is a file, else the named recipe (``demo``, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.name == str(name) and path.suffix in ("", ".toml"):  # a bare name: look it up
        for folder in RECIPE_FOLDERS:
            if (folder / f"{path.stem}.toml").is_file():
                return folder / f"{path.stem}.toml"
    raise UsageError(
        f"recipe not found: {name} (a TOML file, or one of the named recipes: {', '.join(recipe_names())})"
    )


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe TOML file (or a named recipe); every problem is a UsageError naming the file and key."""
    path = find_recipe(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"recipe {path}: not valid TOML: {exc}") from None
    recipe = Recipe()
    for section_name, values in raw.items():
        if section_name == "name" and isinstance(values, str):
            continue
        if section_name not in SECTIONS or not isinstance(values, dict):
            raise UsageError(f"recipe {path}: unknown table [{section_name}] (known: {', '.join(SECTIONS)})")
        section = getattr(recipe, section_name)
        kinds = _fields(type(section))
        for key, value in values.items():
            if key not in kinds:
                raise UsageError(f"recipe {path}: unknown key '{key}' in [{section_name}] (known: {', '.join(kinds)})")
            setattr(section, key, _coerce(value, kinds[key], f"recipe {path}: [{section_name}] {key}"))
    return recipe


def effective(recipe: Recipe) -> Recipe:
    """The recipe as trained: under ``regime = "ra"`` the M views become M x the unique batch, one view
    each, and the schedule is stretched M-fold (same number of steps, same LR rule on B)."""
    if recipe.optim.regime == "ba":
        return recipe
    d, o = recipe.data, recipe.optim
    m = d.views
    return dataclasses.replace(
        recipe,
        data=dataclasses.replace(d, batch_size=d.batch_size * m, views=1),
        optim=dataclasses.replace(
            o, epochs=o.epochs * m, decay_epochs=[e * m for e in o.decay_epochs], warmup_epochs=o.warmup_epochs * m
        ),
    )


def recipe_to_dict(recipe: Recipe) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(recipe)


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser(prog: str, description: str) -> OneLineParser:
    """``--recipe`` plus one flag per recipe field, grouped by table, all defaulting to 'not given'."""
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument(
        "--recipe",
        help="recipe TOML file, or the name of an installed one (demo, imagenet_resnet50_ba, "
        "cifar10_resnet44_ba); flags below override it",
    )
    for section_name, section_cls in SECTIONS.items():
        group = parser.add_argument_group(f"[{section_name}] overrides")
        defaults, kinds = section_cls(), _fields(section_cls)
        for spec in dataclasses.fields(section_cls):
            name, kind = spec.name, kinds[spec.name]
            flag = "--" + name.replace("_", "-")
            dest = f"{section_name}.{name}"
            # argparse formats help with %: a literal one (as in '1% of') must be doubled.
            text = f"{spec.metadata['help']} (default: {getattr(defaults, name)})".replace("%", "%%")
            if kind is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
            else:
                convert = int_list if kind == list[int] else kind
                metavar = "N,N,..." if kind == list[int] else kind.__name__.upper()
                group.add_argument(flag, dest=dest, type=convert, default=None, metavar=metavar, help=text)
    return parser


def resolve(args: argparse.Namespace) -> Recipe:
    """Recipe file (or defaults), then the flags that were given, then range checks."""
    recipe = load_recipe(args.recipe) if args.recipe else Recipe()
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section_name, name = dest.split(".")
            setattr(getattr(recipe, section_name), name, value)
    return recipe.validate()
