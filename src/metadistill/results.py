"""What a run produces: RunResult (accuracies, per-step history, evaluations, cost), or DivergenceError."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

from .meta import Metaparameters


class SearchWall:
    """The wall time of a search of trainings that may be interrupted and resumed: the wall time saved by earlier
    attempts, plus this process's time outside the trainings, plus each training's own wall time (which a
    training resumed from its checkpoint sums over its attempts)."""

    def __init__(self, earlier: float = 0.0) -> None:
        self.earlier, self.started = earlier, time.perf_counter()
        self.in_trainings = self.trainings = 0.0  # this process's time in trainings; their own wall time

    def add_training(self, entered: float, own_wall: float) -> None:
        """A training entered at perf_counter() `entered` has returned; its own wall time was `own_wall`."""
        self.in_trainings += time.perf_counter() - entered
        self.trainings += own_wall

    def __call__(self) -> float:
        return self.earlier + time.perf_counter() - self.started - self.in_trainings + self.trainings


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss (or too many non-finite hypergradients). A batched run's error
    carries its share of the batch's wall time, the step it stopped at and its metaparameters there."""

    wall_s: float = 0.0
    step: int | None = None
    lam: tuple[float, float] | None = None


@dataclass
class RunResult:
    """Outcome of one run: accuracies, per-step history, evaluation points and cost counters."""

    method: str
    seed: int
    final_test_acc: float
    final_val_acc: float
    best_val_acc: float
    test_acc_at_best_val: float
    final_lambda1: float
    final_temperature: float
    steps: int
    hypergrad_evals: int
    full_trainings: int
    wall_s: float
    nonfinite_hypergrads: int = 0
    history: dict[str, list] = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        """What result.json holds: everything but the per-step history (which goes to history.jsonl)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "history"}


def new_history() -> dict[str, list]:
    return {"lambda1": [], "temperature": [], "train_loss": [], "val_loss": []}


@dataclass
class Evaluations:
    """A run's evaluation points, with the best validation accuracy and the test accuracy at it."""

    steps_per_epoch: int
    points: list[dict] = field(default_factory=list)
    best_val: float = -1.0
    test_at_best: float = 0.0

    def add(self, step: int, test: tuple[float, float], val: tuple[float, float], lam: Metaparameters) -> None:
        if val[0] > self.best_val:
            self.best_val, self.test_at_best = val[0], test[0]
        self.points.append({"step": step, "epoch": step / self.steps_per_epoch, "test_acc": test[0],
                            "test_loss": test[1], "val_acc": val[0], "val_loss": val[1],
                            "lambda1": lam.lambda1, "temperature": lam.temperature})
