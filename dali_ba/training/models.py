"""Model stage: small factories for the classifiers the paper trains.

ImageNet: torchvision's ResNets. CIFAR: the ResNet-20/32/44/56/110 of He et al. (2016, section 4.2):
three stages of 16/32/64 channels with n basic blocks each (depth 6n+2), built from torchvision's
BasicBlock with 1x1-conv projection shortcuts where the shape changes.
"""
from __future__ import annotations

from dali_ba.errors import UsageError

IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
MODEL_NAMES = IMAGENET_MODELS + tuple(CIFAR_DEPTHS)


def check_model_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise UsageError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")


def cifar_resnet(depth: int, num_classes: int = 10):
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
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def create_model(name: str, num_classes: int):
    """A freshly initialised classifier (no downloaded weights)."""
    check_model_name(name)
    if name in CIFAR_DEPTHS:
        return cifar_resnet(CIFAR_DEPTHS[name], num_classes)
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
