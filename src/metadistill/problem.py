"""The data of a distillation experiment, and the batches runs draw from it.

Two sources, one interface (`Source`):
- `Problem`: the whole dataset in memory as tensors, teacher logits precomputed per training sample; each
  run draws its batches by its own seeded shuffled indices (run r is the same whether trained alone or
  stacked with others). The paper's experiments use it.
- `Loaders`: any iterables of batches (torch DataLoaders with random augmentation, say) for train,
  validation and test, and a teacher that is either a module, run (in eval mode, without gradient) on
  each training batch as the student sees it, augmented, or a tensor of precomputed per-sample logits
  (then train batches are (x, y, sample index) triples). The data order is the loader's; stacked runs
  see the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .losses import validation_loss
from .steps import Runs

Shard = Callable[[Tensor], Tensor]


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


@dataclass
class Loaders:
    """Data streamed by loaders: `train`, `val`, `test` are iterables of (x, y) batches (train: (x, y, index)
    when `teacher` is a tensor of per-sample logits), iterated afresh every epoch (a DataLoader reshuffles
    and re-augments); `teacher` is a module run on every train batch, or those logits."""

    train: Iterable
    val: Iterable
    test: Iterable
    teacher: nn.Module | Tensor
    make_student: Callable[[], nn.Module]
    steps_per_epoch: int | None = None  # default len(train)


def steps_per_epoch(data: Problem | Loaders, batch_size: int) -> int:
    """Optimizer steps in one epoch: one pass of the train loader, or of the train split in `batch_size`
    batches (0: one full batch)."""
    if isinstance(data, Loaders):
        return data.steps_per_epoch or len(data.train)  # type: ignore[arg-type]
    return 1 if batch_size <= 0 else -(-len(data.x_train) // batch_size)


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


@torch.no_grad()
def evaluate_runs(model: nn.Module, runs: Runs, batches: Iterable[tuple[Tensor, Tensor]], t_val: float = 1.0
                  ) -> list[tuple[float, float]]:
    """Per run (accuracy, validation loss) over shared (x, y) batches, in eval mode; the mode is restored."""
    was_training = model.training
    model.eval()
    correct = loss_sum = None
    count = 0
    for x, y in batches:
        logits = runs.by_run(model(runs.shared(x)))
        target = y.unsqueeze(1).expand(-1, runs.count)
        hits = (logits.argmax(-1) == target).sum(0)
        losses = validation_loss(logits, target, t_val).double() * len(target)
        correct = hits if correct is None else correct + hits
        loss_sum = losses if loss_sum is None else loss_sum + losses
        count += len(target)
    model.train(was_training)
    assert correct is not None and loss_sum is not None, "no evaluation data"
    return [(int(c) / count, float(s) / count) for c, s in zip(correct.tolist(), loss_sum.tolist())]


def _chunks(x: Tensor, y: Tensor, size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, len(x), size):
        yield x[start:start + size], y[start:start + size]


class MemorySource:
    """Batches of R runs from a Problem in memory: each run its own seeded index streams."""

    def __init__(self, problem: Problem, batch_size: int, val_batch_size: int, seeds: list[int],
                 device: torch.device) -> None:
        self.problem = problem.to(device)
        self.make_student = problem.make_student
        self.streams = [batch_streams(self.problem, batch_size, val_batch_size, seed, device) for seed in seeds]
        self.steps_per_epoch = steps_per_epoch(problem, batch_size)

    def train_batch(self, runs: Runs, shard: Shard, teacher_needed: bool = True
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(x, y, the teacher's logits, or None when not `teacher_needed`) of every run's next train batch."""
        index = [next(train) for train, _ in self.streams]
        local = shard(torch.stack(index, dim=1) if runs.stacked else index[0])
        return (self.problem.x_train[local], self.problem.y_train[local],
                self.problem.teacher_train[local] if teacher_needed else None)

    def val_batch(self, runs: Runs, wants: list[bool], shard: Shard) -> tuple[Tensor, Tensor]:
        """Each run that wants a hypergradient draws its own validation batch; the others borrow one."""
        drawn = {r: next(val) for r, (_, val) in enumerate(self.streams) if wants[r]}
        filler = next(iter(drawn.values()))
        index = [drawn.get(r, filler) for r in range(len(self.streams))]
        local = shard(torch.stack(index, dim=1) if runs.stacked else index[0])
        return self.problem.x_val[local], self.problem.y_val[local]

    def evaluate(self, model: nn.Module, runs: Runs, t_val: float) -> tuple[list, list]:
        """(test, validation) per-run (accuracy, loss) on the whole splits."""
        size = max(1, 2048 // runs.count)
        problem = self.problem
        return (evaluate_runs(model, runs, _chunks(problem.x_test, problem.y_test, size), t_val),
                evaluate_runs(model, runs, _chunks(problem.x_val, problem.y_val, size), t_val))

    def state_dict(self) -> list:
        return [{"train": train.state_dict(), "val": val.state_dict()} for train, val in self.streams]

    def load_state_dict(self, state: list) -> None:
        for (train, val), saved in zip(self.streams, state):
            train.load_state_dict(saved["train"])
            val.load_state_dict(saved["val"])


class LoaderSource:
    """Batches from `Loaders`: the same batch for every run; the teacher's logits of the batch as it is."""

    def __init__(self, loaders: Loaders, device: torch.device) -> None:
        self.loaders, self.device = loaders, device
        self.make_student = loaders.make_student
        self.steps_per_epoch = steps_per_epoch(loaders, 0)
        self.train_iter: Iterator | None = None
        self.val_iter: Iterator | None = None
        if isinstance(loaders.teacher, nn.Module):
            loaders.teacher.to(device).eval()

    def _next(self, which: str) -> tuple:
        iterator = getattr(self, f"{which}_iter")
        try:
            if iterator is None:
                raise StopIteration
            return next(iterator)
        except StopIteration:  # a new epoch: the loader reshuffles (and re-augments)
            iterator = iter(getattr(self.loaders, which))
            setattr(self, f"{which}_iter", iterator)
            return next(iterator)

    def train_batch(self, runs: Runs, shard: Shard, teacher_needed: bool = True
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The loader's next batch for every run, with the teacher's logits of it (None when not needed: the
        teacher module is then not run)."""
        batch = self._next("train")
        x, y = batch[0].to(self.device), batch[1].to(self.device)
        teacher = self.loaders.teacher
        if not teacher_needed:
            logits = None
        elif isinstance(teacher, Tensor):
            if len(batch) < 3:
                raise ValueError("with precomputed teacher logits, train batches must be (x, y, sample index)")
            logits = teacher.to(self.device)[batch[2].to(self.device)]
        else:
            with torch.no_grad():
                logits = teacher(x).to(x.dtype)
        if not runs.stacked:
            return x, y, logits
        return (runs.shared(x), y.unsqueeze(1).expand(-1, runs.count),
                None if logits is None else logits.unsqueeze(1).expand(-1, runs.count, -1))

    def val_batch(self, runs: Runs, wants: list[bool], shard: Shard) -> tuple[Tensor, Tensor]:
        x, y = (t.to(self.device) for t in self._next("val")[:2])
        return (runs.shared(x), y.unsqueeze(1).expand(-1, runs.count)) if runs.stacked else (x, y)

    def evaluate(self, model: nn.Module, runs: Runs, t_val: float) -> tuple[list, list]:
        def batches(loader: Iterable) -> Iterator[tuple[Tensor, Tensor]]:
            for batch in loader:
                yield batch[0].to(self.device), batch[1].to(self.device)

        return (evaluate_runs(model, runs, batches(self.loaders.test), t_val),
                evaluate_runs(model, runs, batches(self.loaders.val), t_val))

    def state_dict(self) -> list:
        raise NotImplementedError("runs from loaders cannot checkpoint (a loader's position cannot be saved)")

    def load_state_dict(self, state: list) -> None:
        raise NotImplementedError("runs from loaders cannot checkpoint")


Source = MemorySource | LoaderSource


def source_of(data: Problem | Loaders, batch_size: int, val_batch_size: int, seeds: list[int],
              device: torch.device) -> Source:
    if isinstance(data, Loaders):
        return LoaderSource(data, device)
    return MemorySource(data, batch_size, val_batch_size, seeds, device)
