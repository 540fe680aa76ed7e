"""One training run of a student with a metaparameter strategy: fit(...) -> RunResult; evaluate(...)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from .hypergrad import HYPERGRADIENT_METHODS, TrainStep, UpdateMap, step_hypergradient
from .jvp import record_activations
from .losses import distillation_loss, validation_loss
from .meta import Metaparameters
from .strategies import Strategy

OPTIMIZERS = ("sgd", "adam")


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss."""


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


def _batches(n: int, size: int, generator: torch.Generator, device: torch.device) -> Iterator[Tensor]:
    """Shuffled index batches, a fresh permutation per pass; `size` 0 or >= n is the full set."""
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        if size <= 0 or size >= n:
            yield order
            continue
        yield from order.split(size)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


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
    if keep_for_hypergradient:
        params = {name: p.detach().clone() for name, p in model.named_parameters()}
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        with record_activations(model) as record:
            logits = model(x)
    else:
        logits = model(x)
    loss = distillation_loss(logits, teacher, y, lam.lambda1, lam.temperature, t2_scaling)
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        return loss_value, None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if not keep_for_hypergradient:
        optimizer.step()
        return loss_value, None
    update = UpdateMap(optimizer)
    optimizer.step()
    return loss_value, TakenStep(TrainStep(model, params, buffers, x, y, teacher, lam, t2_scaling, logits, record),
                                 update)


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
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.lr_decay_every or config.epochs + 1, gamma=config.lr_decay_factor)
    train_order = torch.Generator().manual_seed(2 * seed)
    val_order = torch.Generator().manual_seed(2 * seed + 1)
    n_train = len(problem.x_train)
    steps_per_epoch = 1 if config.batch_size <= 0 else math.ceil(n_train / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    eval_every = config.eval_every or steps_per_epoch
    val_batches = _batches(len(problem.x_val), config.val_batch_size or config.batch_size, val_order, device)
    train_batches = _batches(n_train, config.batch_size, train_order, device)

    lam = strategy.start(seed)
    history: dict[str, list] = {"lambda1": [], "temperature": [], "train_loss": [], "val_loss": []}
    evals: list[dict] = []
    hypergrad_evals = 0
    best_val, test_at_best = -1.0, 0.0

    def record_eval(step: int) -> None:
        nonlocal best_val, test_at_best
        test_acc, test_loss = evaluate(model, problem.x_test, problem.y_test, config.t_val)
        val_acc, val_loss = evaluate(model, problem.x_val, problem.y_val, config.t_val)
        if val_acc > best_val:
            best_val, test_at_best = val_acc, test_acc
        evals.append({"step": step, "epoch": step / steps_per_epoch, "test_acc": test_acc,
                      "test_loss": test_loss, "val_acc": val_acc, "val_loss": val_loss,
                      "lambda1": lam.lambda1, "temperature": lam.temperature})

    for step in range(total_steps):
        index = next(train_batches)
        history["lambda1"].append(lam.lambda1)
        history["temperature"].append(lam.temperature)
        wants = strategy.wants_hypergradient(step)
        loss_value, taken = train_step(model, optimizer, problem.x_train[index], problem.y_train[index],
                                       problem.teacher_train[index], lam, config.t2_scaling, wants)
        if not math.isfinite(loss_value):
            raise DivergenceError(
                f"training diverged at step {step} (epoch {step // steps_per_epoch}): loss {loss_value} "
                f"with lambda1={lam.lambda1:.4g}, T={lam.temperature:.4g}, lr={optimizer.param_groups[0]['lr']:.4g}")
        history["train_loss"].append(loss_value)
        history["val_loss"].append(None)

        def hypergradient(taken: TakenStep | None = taken) -> Tensor:
            nonlocal hypergrad_evals
            assert taken is not None
            hypergrad_evals += 1
            v_index = next(val_batches)
            h, val_loss = taken.hypergradient(problem.x_val[v_index], problem.y_val[v_index], config.t_val,
                                              config.hypergrad_method)
            history["val_loss"][-1] = val_loss
            return h

        lam = strategy.advance(step, hypergradient if wants else _refuse)
        if (step + 1) % steps_per_epoch == 0:
            scheduler.step()
        if (step + 1) % eval_every == 0 or step + 1 == total_steps:
            record_eval(step + 1)
        if progress is not None:
            progress(step + 1, total_steps)

    final = evals[-1]
    return RunResult(
        method=strategy.name, seed=seed, final_test_acc=final["test_acc"], final_val_acc=final["val_acc"],
        best_val_acc=best_val, test_acc_at_best_val=test_at_best, final_lambda1=lam.lambda1,
        final_temperature=lam.temperature, steps=total_steps, hypergrad_evals=hypergrad_evals,
        full_trainings=1, wall_s=time.perf_counter() - started, history=history, evals=evals)
