"""The data of a distillation experiment held in memory, and the seeded index batches runs draw from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Problem:
    """The data of one distillation experiment, held in memory; teacher logits indexed by train sample."""

    x_train: Tensor
    y_train: Tensor
    teacher_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    make_student: Callable[[], nn.Module]

    def to(self, device: str | torch.device) -> Problem:
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.__dict__.items()}
        return Problem(**moved)


class IndexStream:
    """Shuffled index batches of range(n): a fresh permutation per pass, split into batches of `size`
    (0, or >= n: the whole permutation is one batch), with a state a checkpoint can hold."""

    def __init__(self, n: int, size: int, seed: int, device: torch.device) -> None:
        self.n, self.device = n, device
        self.size = 0 if size >= n else size  # 0: full batch
        self.generator = torch.Generator().manual_seed(seed)
        self.chunks: list[Tensor] = []
        self.position = 0

    def _split(self, order: Tensor) -> list[Tensor]:
        return [order] if self.size <= 0 else list(order.split(self.size))

    def __iter__(self) -> IndexStream:
        return self

    def __next__(self) -> Tensor:
        if self.position == len(self.chunks):
            self.chunks = self._split(torch.randperm(self.n, generator=self.generator).to(self.device))
            self.position = 0
        self.position += 1
        return self.chunks[self.position - 1]

    def state_dict(self) -> dict:
        order = torch.cat(self.chunks).cpu() if self.chunks else None
        return {"generator": self.generator.get_state(), "order": order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.chunks = [] if state["order"] is None else self._split(state["order"].to(self.device))
        self.position = state["position"]


def batch_streams(problem: Problem, batch_size: int, val_batch_size: int, seed: int, device: torch.device
                  ) -> tuple[IndexStream, IndexStream]:
    """A run's train and validation index batches (streams seeded 2 * seed and 2 * seed + 1)."""
    return (IndexStream(len(problem.x_train), batch_size, 2 * seed, device),
            IndexStream(len(problem.x_val), val_batch_size or batch_size, 2 * seed + 1, device))
