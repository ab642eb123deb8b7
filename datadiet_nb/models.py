"""A small registry of classifiers by name: CIFAR-form ResNets and a small CNN for 8x8 digits.

``build(name, num_classes=..., in_channels=..., **options)``; the class count always comes from
the dataset. Register your own constructor with ``@register("name")``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import UserError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a constructor ``fn(num_classes, in_channels, **options)`` to the registry."""
    def add(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = constructor
        return constructor
    return add


def check_name(name: str) -> None:
    """Raise a one-line UserError for a model name that is not registered."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")


def build(name: str, *, num_classes: int, in_channels: int = 3, **options) -> nn.Module:
    """Construct a registered model for a dataset with ``num_classes`` classes."""
    check_name(name)
    try:
        return MODELS[name](num_classes=num_classes, in_channels=in_channels, **options)
    except TypeError as error:
        raise UserError(f"model {name!r}: {error}") from None


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- CIFAR ResNets (He et al. 2016, in the low-resolution form: 3x3 stride-1 stem, no max-pool) ---

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    """CIFAR ResNet; ``width`` is the channel count of the first stage (64 in the standard model).

    ``zero_init_residual`` starts the last BatchNorm scale of every block at 0, so each block begins as
    the identity (Goyal et al. 2017); Data Diet's original ResNet-50 does this.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], blocks_per_stage: tuple[int, ...], *,
                 num_classes: int, in_channels: int = 3, width: int = 64, zero_init_residual: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, in_planes = [], width
        for stage, num_blocks in enumerate(blocks_per_stage):
            planes = width * 2 ** stage
            for i in range(num_blocks):
                stages.append(block(in_planes, planes, stride=2 if stage > 0 and i == 0 else 1))
                in_planes = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        if zero_init_residual:
            for block_module in self.stages:
                nn.init.zeros_(block_module.last_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


@register("resnet18")
def resnet18(*, num_classes: int, in_channels: int = 3, width: int = 64, zero_init_residual: bool = False) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=width,
                  zero_init_residual=zero_init_residual)


@register("resnet50")
def resnet50(*, num_classes: int, in_channels: int = 3, width: int = 64, zero_init_residual: bool = False) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, width=width,
                  zero_init_residual=zero_init_residual)


@register("smallcnn")
def small_cnn(*, num_classes: int, in_channels: int = 1, width: int = 32) -> nn.Sequential:
    """Two conv-BN-ReLU layers, a max-pool and a linear head: enough for 8x8 digits in seconds on a CPU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, num_classes),
    )
