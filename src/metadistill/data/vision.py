"""Fashion-MNIST and CIFAR-10 (full and reduced) from the official files, as normalised in-memory tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

VISION_DATASETS = ("fashion-mnist", "cifar10", "cifar10-reduced")


class DataError(RuntimeError):
    """Dataset files are missing or corrupt; the message says where they were looked for and how to get them."""


@dataclass
class VisionData:
    """Normalised float32 images N x C x H x W and int64 labels, split into train / validation / test."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: int = 10


def load_vision(dataset: str, data_dir: Path | str | None = None, download: bool = False) -> VisionData:
    """Load `dataset` (one of VISION_DATASETS) with the paper's splits and normalisation."""
    raise NotImplementedError
