"""Students (and, for the synthetic task, the teacher) by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def logistic_regression(in_features: int, classes: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, classes))


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3), nn.BatchNorm2d(out_channels), nn.ReLU(), nn.MaxPool2d(2)]


def conv_student(in_channels: int, widths: tuple[int, int, int], classes: int = 10) -> nn.Module:
    """The paper's students: three blocks (3x3 unpadded conv, BatchNorm, ReLU, 2x2 max-pool), fc 128->64->classes.

    1x28x28 input with widths (8, 16, 128) leaves 128x1x1 (about 29k parameters, Fashion-MNIST);
    3x32x32 with (8, 16, 32) leaves 32x2x2 (about 15k, CIFAR-10).
    """
    a, b, c = widths
    return nn.Sequential(
        *_conv_block(in_channels, a), *_conv_block(a, b), *_conv_block(b, c),
        nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, classes),
    )


def fashion_student() -> nn.Module:
    return conv_student(1, (8, 16, 128))


def cifar_student() -> nn.Module:
    return conv_student(3, (8, 16, 32))


STUDENTS: dict[str, Callable[[], nn.Module]] = {
    "synthetic": lambda: logistic_regression(3, 2),
    "fashion-mnist": fashion_student,
    "cifar10": cifar_student,
}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
