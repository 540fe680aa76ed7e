"""How a student is trained: TrainConfig, its optimizer and lr schedule, and the step schedule of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .meta import Metaparameters
from .steps import HYPERGRADIENT_METHODS
from .updates import ADAM_UPDATES

OPTIMIZERS = ("sgd", "adam")


@dataclass
class TrainConfig:
    """How the student is trained. batch_size 0 means full batch; lr_decay_every 0 means a constant lr."""

    epochs: int = 1
    batch_size: int = 128
    val_batch_size: int = 0  # 0: same as batch_size
    lr: float = 1.0
    optimizer: str = "sgd"
    momentum: float = 0.0  # SGD only
    weight_decay: float = 0.0
    lr_decay_every: int = 0  # epochs
    lr_decay_factor: float = 0.5
    t_val: float = 1.0
    t2_scaling: bool = False
    hypergrad_method: str = "jvp"
    adam_update: str = "exact"  # how hypergradients differentiate an Adam step (see updates.UpdateMap)
    max_nonfinite_fraction: float = 0.05  # a run with more non-finite hypergradients (beyond 10) fails
    eval_every: int = 0  # steps; 0: at the end of every epoch
    device: str = "cpu"
    # a single student's 4-d weights in channels-last memory order (stacked students always are): its
    # convolutions and max-pooling then run in it, 1.3x faster per step for the Fashion-MNIST student on a CPU
    channels_last: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 0, "batch_size must be >= 0 (0: full batch)"),
            (self.val_batch_size >= 0, "val_batch_size must be >= 0"),
            (math.isfinite(self.lr) and self.lr > 0, "lr must be a positive number"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.lr_decay_every >= 0, "lr_decay_every must be >= 0"),
            (0 < self.lr_decay_factor <= 1, "lr_decay_factor must be in (0, 1]"),
            (math.isfinite(self.t_val) and self.t_val > 0, "t_val must be a positive number"),
            (self.hypergrad_method in HYPERGRADIENT_METHODS,
             f"hypergrad_method must be one of {', '.join(HYPERGRADIENT_METHODS)}"),
            (self.adam_update in ADAM_UPDATES, f"adam_update must be one of {', '.join(ADAM_UPDATES)}"),
            (0 <= self.max_nonfinite_fraction <= 1, "max_nonfinite_fraction must be in [0, 1]"),
            (self.eval_every >= 0, "eval_every must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The student's optimizer over its trainable weights (frozen ones are left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.StepLR:
    """The lr schedule, stepped once per epoch: x lr_decay_factor every lr_decay_every epochs (0: never)."""
    return torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.lr_decay_every or config.epochs + 1, gamma=config.lr_decay_factor)


@dataclass
class Schedule:
    """Steps of a run: epochs of `steps_per_epoch` steps, an evaluation every `eval_every` steps and at the end."""

    steps_per_epoch: int
    total_steps: int
    eval_every: int

    @classmethod
    def of(cls, config: TrainConfig, steps_per_epoch: int) -> Schedule:
        return cls(steps_per_epoch, steps_per_epoch * config.epochs, config.eval_every or steps_per_epoch)

    def ends_epoch(self, step: int) -> bool:
        return (step + 1) % self.steps_per_epoch == 0

    def evaluates(self, step: int) -> bool:
        return (step + 1) % self.eval_every == 0 or step + 1 == self.total_steps

    def divergence(self, step: int, loss: float, lam: Metaparameters, lr: float) -> str:
        return (f"training diverged at step {step} (epoch {step // self.steps_per_epoch}): loss {loss} "
                f"with lambda1={lam.lambda1:.4g}, T={lam.temperature:.4g}, lr={lr:.4g}")
