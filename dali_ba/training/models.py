"""Model stage: ``--arch`` names any classifier, freshly initialised (no downloaded weights), with as
many classes as the data has.

- The paper's CIFAR networks (its Table 1), built here for 32 px views: the ResNet-20/32/44/56/110 of
  He et al. (2016, section 4.2: three stages of 16/32/64 channels, n basic blocks each, depth 6n+2),
  ``vgg16_cifar`` (VGG-16 with BatchNorm and the classifier of the authors' code for 32 px views),
  ``wrn28_10`` (Wide-ResNet-28-10, Zagoruyko & Komodakis 2016, dropout
  ``[model] dropout`` between its convolutions) and ``densenet_bc_100_12`` (DenseNet-BC, L = 100,
  k = 12, Huang et al. 2017). AmoebaNet, the paper's fifth, is not built.
- Any torchvision classification builder by name: ``resnet50``, ``alexnet``, ``mobilenet_v2``,
  ``vit_b_16``, ...
- ``timm:<name>``: ``timm.create_model(name, pretrained=False)``.
- ``package.module:function``: a user's factory, imported from the working directory or the installed
  packages and called as ``function(num_classes=N)``; it must return an ``nn.Module``.

Every name is checked before any rank starts (:func:`check_model_name`); a model that cannot take the
run's views is a one-line error at set-up (:func:`check_input_size`), not a shape traceback mid-step.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from dali_ba.errors import UsageError

if TYPE_CHECKING:
    import torch.nn as nn

CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
PAPER_CIFAR = (*CIFAR_DEPTHS, "vgg16_cifar", "wrn28_10", "densenet_bc_100_12")
TIMM = "timm:"


def check_model_name(name: str) -> None:
    """UsageError (one line) unless ``name`` is an architecture :func:`create_model` can build."""
    if name in PAPER_CIFAR:
        return
    if name.startswith(TIMM):
        timm = _timm(name)
        if not timm.is_model(name[len(TIMM) :]):
            raise UsageError(
                f"--arch {name}: timm {timm.__version__} has no model {name[len(TIMM) :]!r} "
                "(python -c 'import timm; print(timm.list_models())' lists them)"
            )
    elif ":" in name:
        _factory(name)
    elif name not in torchvision_names():
        raise UsageError(
            f"unknown model {name!r} (--arch): not one of the paper's CIFAR networks ({', '.join(PAPER_CIFAR)}), "
            "nor a torchvision classification model, nor timm:<name> or module:function "
            "(python -m dali_ba.train --list-archs)"
        )


def create_model(name: str, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """A freshly initialised classifier for ``num_classes`` classes (see the module for the names)."""
    check_model_name(name)
    if name in CIFAR_DEPTHS:
        return cifar_resnet(CIFAR_DEPTHS[name], num_classes)
    if name == "vgg16_cifar":
        return vgg16_cifar(num_classes)
    if name == "wrn28_10":
        return wide_resnet(28, 10, num_classes, dropout)
    if name == "densenet_bc_100_12":
        return densenet_bc(100, 12, num_classes)
    if name.startswith(TIMM):
        return _timm(name).create_model(name[len(TIMM) :], pretrained=False, num_classes=num_classes)
    if ":" in name:
        return _built_by_factory(name, num_classes)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


@functools.lru_cache(maxsize=8)
def count_parameters(name: str, num_classes: int, dropout: float = 0.0) -> int | None:
    """The model's parameter count, from the model itself: built on torch's meta device (shapes only, no
    memory, no initialisation cost), or on the CPU where a builder reads tensor values (timm's drop-path
    rates); None where neither builds (the run's own build then names the problem)."""
    import torch

    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = create_model(name, num_classes, dropout)
        except UsageError:
            raise
        except Exception:
            continue
        return sum(p.numel() for p in model.parameters())
    return None


def check_input_size(model: nn.Module, name: str, sizes: Sequence[tuple[int, str]], device) -> None:
    """One forward of a single image at each size the run will feed the model (eval mode, no gradient,
    nothing learnt): a size the model cannot take (a ViT built for 224, AlexNet's pooling under 63 px) is
    a one-line error before the first step, not a traceback at the first evaluation. ``sizes``: each
    size with what sets it, "--view-size" (training views, --eval-views and --calibrate-bn) or "--val-crop"."""
    import torch

    training = model.training
    model.eval()
    try:
        tried: set[int] = set()
        for size, flag in sizes:
            if size in tried:
                continue
            tried.add(size)
            try:
                with torch.no_grad():
                    model(torch.zeros(1, 3, size, size, device=device))
            except (RuntimeError, AssertionError, ValueError) as exc:
                what = "views" if flag == "--view-size" else "inputs"
                raise UsageError(
                    f"--arch {name} cannot take {size}x{size} px {what} ({flag} {size}): {_first_line(exc)}"
                ) from None
    finally:
        model.train(training)


def list_archs() -> list[str]:
    """What ``--list-archs`` prints: the paper's CIFAR networks, torchvision's builders, timm's count."""
    lines = [
        "the paper's CIFAR networks (built here, for 32 px views):",
        "  " + " ".join(PAPER_CIFAR),
        f"torchvision {_version('torchvision')} classification models ({len(torchvision_names())}):",
    ]
    lines += ["  " + " ".join(torchvision_names())]
    if importlib.util.find_spec("timm") is None:
        lines.append("timm:<name>: timm is not installed (pip install timm)")
    else:
        import timm

        lines.append(
            f"timm:<name>: {len(timm.list_models())} models of timm {timm.__version__} "
            "(python -c 'import timm; print(timm.list_models())')"
        )
    lines.append("package.module:function: your own factory, called with num_classes=N")
    return lines


def torchvision_names() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


# --- the paper's CIFAR networks ---------------------------------------------------------------------


def cifar_resnet(depth: int, num_classes: int = 10) -> nn.Module:
    import torch.nn as nn
    from torchvision.models.resnet import BasicBlock

    if (depth - 2) % 6:
        raise UsageError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    blocks = (depth - 2) // 6
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)]
    in_ch = 16
    for out_ch, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            shortcut = None
            if s != 1 or in_ch != out_ch:
                shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=s, bias=False), nn.BatchNorm2d(out_ch))
            layers.append(BasicBlock(in_ch, out_ch, stride=s, downsample=shortcut))
            in_ch = out_ch
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
    _kaiming(model)
    return model


def vgg16_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's VGG-16-BN convolutions (five stages: a 32 px view down to 512 x 1 x 1), then the
    authors' classifier (convNet.pytorch, models/vgg.py): 512 -> 4096 -> 4096 -> classes, ReLU and
    dropout 0.5 between."""
    import torch.nn as nn
    import torchvision

    features = torchvision.models.vgg16_bn(weights=None).features
    model = nn.Sequential(
        features,
        nn.Flatten(),
        nn.Linear(512, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(4096, num_classes),
    )
    _kaiming(model)
    return model


def wide_resnet(depth: int, width: int, num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    """WRN-depth-width: pre-activation basic blocks (BN-ReLU-conv, dropout between the two convs), three
    stages of 16k/32k/64k channels with (depth - 4) / 6 blocks each."""
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
            super().__init__()
            self.bn1, self.bn2 = nn.BatchNorm2d(in_ch), nn.BatchNorm2d(out_ch)
            self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
            self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
            self.drop = nn.Dropout(dropout)
            self.relu = nn.ReLU(inplace=True)
            self.shortcut = (
                None if in_ch == out_ch and stride == 1 else nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
            )

        def forward(self, x):
            out = self.relu(self.bn1(x))
            skip = x if self.shortcut is None else self.shortcut(out)
            out = self.conv2(self.drop(self.relu(self.bn2(self.conv1(out)))))
            return out + skip

    if (depth - 4) % 6:
        raise UsageError(f"Wide-ResNet depth must be 6n+4, got {depth}")
    blocks, channels = (depth - 4) // 6, (16 * width, 32 * width, 64 * width)
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False)]
    in_ch = 16
    for out_ch, stride in zip(channels, (1, 2, 2)):
        for i in range(blocks):
            layers.append(Block(in_ch, out_ch, stride if i == 0 else 1))
            in_ch = out_ch
    model = nn.Sequential(
        *layers,
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(in_ch, num_classes),
    )
    _kaiming(model)
    return model


def densenet_bc(depth: int, growth: int, num_classes: int = 10) -> nn.Module:
    """torchvision's DenseNet (bottleneck layers, transitions that halve the channels: the BC variant)
    with three dense blocks of (depth - 4) / 6 layers and a 3x3 stem of 2k channels for 32 px views."""
    import torch.nn as nn
    from torchvision.models.densenet import DenseNet

    if (depth - 4) % 6:
        raise UsageError(f"DenseNet-BC depth must be 6n+4, got {depth}")
    layers = (depth - 4) // 6
    model = DenseNet(
        growth_rate=growth, block_config=(layers,) * 3, num_init_features=2 * growth, bn_size=4, num_classes=num_classes
    )
    model.features.conv0 = nn.Conv2d(3, 2 * growth, 3, padding=1, bias=False)
    model.features.pool0 = nn.Identity()  # 32 px views: no ImageNet stem down-sampling
    nn.init.kaiming_normal_(model.features.conv0.weight)
    return model


def _kaiming(model: nn.Module) -> None:
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


# --- other sources ---------------------------------------------------------------------------------


def _timm(name: str):
    if importlib.util.find_spec("timm") is None:
        raise UsageError(f"--arch {name} needs the timm package, which is not installed: pip install timm")
    import timm

    return timm


def _factory(name: str) -> Callable[..., nn.Module]:
    """The function ``package.module:function`` names, imported (the working directory first)."""
    module_name, _, function = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(
            f"--arch {name}: cannot import {module_name} ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise UsageError(f"--arch {name}: {module_name} has no function {function!r}")
    return factory


def _built_by_factory(name: str, num_classes: int) -> nn.Module:
    import torch.nn as nn

    try:
        model = _factory(name)(num_classes=num_classes)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(
            f"--arch {name}: {name.partition(':')[2]}(num_classes={num_classes}) failed "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--arch {name}: {name.partition(':')[2]}(num_classes={num_classes}) returned a "
            f"{type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
