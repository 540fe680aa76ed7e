"""Teacher architectures by name: the paper's PreAct-ResNet18 and a CPU-practical small CNN."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

CLASSES = 10


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings"): BN-ReLU-conv3x3, BN-ReLU-conv3x3, + shortcut.

    A 1x1 projection shortcut, applied to the pre-activated input, is used only where the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(x).relu()
        # The projection sees the normalised input, the identity the raw one (pre-activation design).
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.bn2(out).relu())
        return out + skip


class PreActResNet18(nn.Module):
    """PreAct-ResNet18 for small images: 3x3 stem conv (stride 1), stages [2, 2, 2, 2] of widths 64-128-256-512,
    a final BN-ReLU, global average pooling and fc -> 10 (about 11.2M parameters).

    Global average pooling makes it size-agnostic: 32x32 ends at 4x4, 28x28 at 4x4 too (28 -> 14 -> 7 -> 4).
    """

    def __init__(self, in_channels: int, classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        width = 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [PreActBlock(width, out_channels, stride), PreActBlock(out_channels, out_channels)]
            width = out_channels
        self.stages = nn.Sequential(*stages)
        # Pre-activation blocks leave their sum un-normalised, so the head normalises once more.
        self.head = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(width, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]


def small_cnn(in_channels: int, classes: int = CLASSES) -> nn.Module:
    """"cnn-small": a teacher that trains on 2 CPU cores in minutes (Fashion-MNIST: see presets/fashion-mnist.toml).

    Padded 3x3 conv-BN-ReLU blocks, 32 | 64, 64 | 128 channels with a 2x2 max-pool after the first two groups
    and an adaptive 3x3 max-pool after the last (28 -> 14 -> 7 -> 3, 32 -> 16 -> 8 -> 3), then dropout, fc 256,
    dropout, fc -> classes (about 0.43M parameters). The 28x28 stage has a single conv with one input channel
    (cheap); the depth sits at 14x14 and below, where it costs less. The adaptive pool fixes the fc input for
    any image size, so no lazy layer (which optimisers cannot take before a first forward) is needed.
    """
    return nn.Sequential(
        *_conv_bn_relu(in_channels, 32), nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64), *_conv_bn_relu(64, 64), nn.MaxPool2d(2),
        *_conv_bn_relu(64, 128), nn.AdaptiveMaxPool2d(3),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 9, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, classes),
    )


TEACHERS: dict[str, Callable[[int], nn.Module]] = {
    "preact-resnet18": PreActResNet18,
    "cnn-small": small_cnn,
}
