"""One training run of a student with a metaparameter strategy: fit(...) -> RunResult; evaluate(...)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from .hypergrad import HYPERGRADIENT_METHODS, TrainStep, UpdateMap, step_hypergradient
from .jvp import ActivationRecord, record_activations
from .losses import distillation_loss, validation_loss
from .meta import Metaparameters
from .strategies import Strategy

OPTIMIZERS = ("sgd", "adam")


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss. A batched run's error carries its share of the batch's wall time."""

    wall_s: float = 0.0


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
class TrainConfig:
    """How the student is trained. batch_size 0 means full batch; lr_decay_every 0 means a constant lr."""

    epochs: int = 1
    batch_size: int = 128
    val_batch_size: int = 0  # 0: same as batch_size
    lr: float = 1.0
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_decay_every: int = 0  # epochs
    lr_decay_factor: float = 0.5
    t_val: float = 1.0
    t2_scaling: bool = False
    hypergrad_method: str = "jvp"
    eval_every: int = 0  # steps; 0: at the end of every epoch
    device: str = "cpu"

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
            (self.eval_every >= 0, "eval_every must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


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
    history: dict[str, list] = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        """What result.json holds: everything but the per-step history (which goes to history.jsonl)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "history"}


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, t_val: float = 1.0, batch_size: int = 2048) -> tuple[float, float]:
    """(accuracy, validation loss) in eval mode; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        correct += int((logits.argmax(1) == target).sum())
        loss_sum += float(validation_loss(logits, target, t_val)) * len(target)
    model.train(was_training)
    return correct / len(x), loss_sum / len(x)


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


def batch_streams(problem: Problem, config: TrainConfig, seed: int, device: torch.device
                  ) -> tuple[IndexStream, IndexStream]:
    """The run's train and validation index batches (streams seeded 2 * seed and 2 * seed + 1)."""
    return (IndexStream(len(problem.x_train), config.batch_size, 2 * seed, device),
            IndexStream(len(problem.x_val), config.val_batch_size or config.batch_size, 2 * seed + 1, device))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


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
    def of(cls, config: TrainConfig, n_train: int) -> Schedule:
        steps_per_epoch = 1 if config.batch_size <= 0 else math.ceil(n_train / config.batch_size)
        return cls(steps_per_epoch, steps_per_epoch * config.epochs, config.eval_every or steps_per_epoch)

    def ends_epoch(self, step: int) -> bool:
        return (step + 1) % self.steps_per_epoch == 0

    def evaluates(self, step: int) -> bool:
        return (step + 1) % self.eval_every == 0 or step + 1 == self.total_steps

    def divergence(self, step: int, loss: float, lam: Metaparameters, lr: float) -> str:
        return (f"training diverged at step {step} (epoch {step // self.steps_per_epoch}): loss {loss} "
                f"with lambda1={lam.lambda1:.4g}, T={lam.temperature:.4g}, lr={lr:.4g}")


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

    def result(self, method: str, seed: int, lam: Metaparameters, steps: int, hypergrad_evals: int, wall_s: float,
               history: dict[str, list], extra: dict | None = None) -> RunResult:
        final = self.points[-1]
        return RunResult(
            method=method, seed=seed, final_test_acc=final["test_acc"], final_val_acc=final["val_acc"],
            best_val_acc=self.best_val, test_acc_at_best_val=self.test_at_best, final_lambda1=lam.lambda1,
            final_temperature=lam.temperature, steps=steps, hypergrad_evals=hypergrad_evals, full_trainings=1,
            wall_s=wall_s, history=history, evals=self.points, extra=extra or {})


def new_history() -> dict[str, list]:
    return {"lambda1": [], "temperature": [], "train_loss": [], "val_loss": []}


def forward_keeping(model: nn.Module, x: Tensor, keep: bool, call: Callable[[Tensor], Tensor] | None = None
                    ) -> tuple[Tensor, tuple[dict[str, Tensor], dict[str, Tensor], ActivationRecord] | None]:
    """The logits of `call` (default: the model) on x; with `keep`, also what the step's hypergradient
    needs: the model's weights and buffers before the step and the activations of this forward pass."""
    call = call or model
    if not keep:
        return call(x), None
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    with record_activations(model) as record:
        logits = call(x)
    return logits, (params, buffers, record)


def _refuse() -> Tensor:
    raise RuntimeError("the strategy asked for a hypergradient at a step where it said it would not")


@dataclass
class TakenStep:
    """A real step already taken, with what its hypergradient needs (the loop's shared ordering)."""

    step: TrainStep
    update: UpdateMap

    def hypergradient(self, x_val: Tensor, y_val: Tensor, t_val: float = 1.0,
                      method: str = "jvp") -> tuple[Tensor, float]:
        """(h, L_val(w')) for the step: v at the new weights, then the mixed product at the old ones."""
        model = self.step.model
        return step_hypergradient(self.step, lambda v: self.update.apply(model, v), x_val, y_val, t_val, method)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, teacher: Tensor,
               lam: Metaparameters, t2_scaling: bool = False,
               keep_for_hypergradient: bool = False) -> tuple[float, TakenStep | None]:
    """One real distillation step. With `keep_for_hypergradient`, the weights before the step and the
    forward pass's activations are kept so that the step doubles as the virtual step of the greedy
    hypergradient. A non-finite loss is returned without stepping."""
    logits, kept = forward_keeping(model, x, keep_for_hypergradient)
    loss = distillation_loss(logits, teacher, y, lam.lambda1, lam.temperature, t2_scaling)
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        return loss_value, None
    return loss_value, optimizer_step(model, optimizer, loss, kept, x, y, teacher, lam, t2_scaling, logits)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor,
                   kept: tuple[dict[str, Tensor], dict[str, Tensor], ActivationRecord] | None, x: Tensor, y: Tensor,
                   teacher: Tensor, lam: Metaparameters, t2_scaling: bool, logits: Tensor) -> TakenStep | None:
    """Backward of `loss` and the optimizer step; with what `forward_keeping` kept, the TakenStep whose
    hypergradient can then be computed."""
    update = backward_and_step(optimizer, loss, kept is not None)
    if kept is None or update is None:
        return None
    params, buffers, record = kept
    return TakenStep(TrainStep(model, params, buffers, x, y, teacher, lam, t2_scaling, logits, record), update)


def backward_and_step(optimizer: torch.optim.Optimizer, loss: Tensor, read_update: bool) -> UpdateMap | None:
    """Backward of `loss` and the optimizer step; with `read_update`, the step's UpdateMap (read around it)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    update = UpdateMap(optimizer) if read_update else None
    optimizer.step()
    return update


def fit(
    problem: Problem,
    strategy: Strategy,
    config: TrainConfig,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Train a fresh student with `strategy` choosing lambda at every step; seed fixes init and data order.

    Raises DivergenceError when the training loss becomes non-finite.
    """
    started = time.perf_counter()
    device = torch.device(config.device)
    problem = problem.to(device)
    torch.manual_seed(seed)
    model = problem.make_student().to(device)
    model.train()
    optimizer = build_optimizer(model, config)

    def take_step(index: Tensor, lam: Metaparameters, wants: bool) -> tuple[float, TakenStep | None]:
        return train_step(model, optimizer, problem.x_train[index], problem.y_train[index],
                          problem.teacher_train[index], lam, config.t2_scaling, wants)

    def hypergradient_of(taken: TakenStep, v_index: Tensor) -> tuple[Tensor, float]:
        return taken.hypergradient(problem.x_val[v_index], problem.y_val[v_index], config.t_val,
                                   config.hypergrad_method)

    return run_loop(problem, strategy, config, seed, model, optimizer, take_step, hypergradient_of, progress,
                    started)


def run_loop(
    problem: Problem,
    strategy: Strategy,
    config: TrainConfig,
    seed: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    take_step: Callable[[Tensor, Metaparameters, bool], tuple[float, TakenStep | None]],
    hypergradient_of: Callable[[TakenStep, Tensor], tuple[Tensor, float]],
    progress: Callable[[int, int], None] | None = None,
    started: float | None = None,
) -> RunResult:
    """The training loop of one run: batches, the strategy's lambda at every step, hypergradients where it
    asks, the lr schedule and evaluations. `take_step(index, lam, wants)` takes the real step on the
    train batch `index`; `hypergradient_of(taken, val_index)` returns (h, L_val) of a step taken with
    wants=True. `fit` gives them one process; `ddp.fit_ddp` its shard of each batch."""
    started = time.perf_counter() if started is None else started
    device = next(model.parameters()).device
    scheduler = build_scheduler(optimizer, config)
    schedule = Schedule.of(config, len(problem.x_train))
    train_batches, val_batches = batch_streams(problem, config, seed, device)
    lam = strategy.start(seed)
    history = new_history()
    evaluations = Evaluations(schedule.steps_per_epoch)
    hypergrad_evals = 0

    for step in range(schedule.total_steps):
        index = next(train_batches)
        history["lambda1"].append(lam.lambda1)
        history["temperature"].append(lam.temperature)
        wants = strategy.wants_hypergradient(step)
        loss_value, taken = take_step(index, lam, wants)
        if not math.isfinite(loss_value):
            raise DivergenceError(schedule.divergence(step, loss_value, lam, optimizer.param_groups[0]["lr"]))
        history["train_loss"].append(loss_value)
        history["val_loss"].append(None)

        def hypergradient(taken: TakenStep | None = taken) -> Tensor:
            nonlocal hypergrad_evals
            assert taken is not None
            hypergrad_evals += 1
            h, history["val_loss"][-1] = hypergradient_of(taken, next(val_batches))
            return h

        lam = strategy.advance(step, hypergradient if wants else _refuse)
        if schedule.ends_epoch(step):
            scheduler.step()
        if schedule.evaluates(step):
            evaluations.add(step + 1, evaluate(model, problem.x_test, problem.y_test, config.t_val),
                            evaluate(model, problem.x_val, problem.y_val, config.t_val), lam)
        if progress is not None:
            progress(step + 1, schedule.total_steps)

    return evaluations.result(strategy.name, seed, lam, schedule.total_steps, hypergrad_evals,
                              time.perf_counter() - started, history)
