"""R runs of one method trained together as one computation: fit_batched(...) -> one outcome per run.

Run r of the batch is the same computation as `fit(problem, strategies[r], config, seeds[r])`: the
same initial weights (the student built after torch.manual_seed(seed)), the same data order (its own
index streams), its own metaparameters, strategy, BatchNorm statistics, greedy hypergradient (the jvp
method) and evaluations. Only the arithmetic is shared: the R students are one stacked model
(`stacked.stack_models`), the loss is the sum of the R per-run losses, so run r's weights receive
exactly run r's gradient, and SGD/Adam act element-wise. Results agree with one-at-a-time runs to
float rounding; `fit` stays the readable reference.

A run whose loss becomes non-finite is stopped (its outcome is a DivergenceError, as `fit` would
raise); the others go on unaffected, since nothing couples the runs.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .hypergrad import UpdateMap
from .jvp import ActivationRecord, logits_jvp
from .losses import mixed_derivative, per_run_distillation_loss, per_run_validation_loss
from .meta import Metaparameters
from .records import write_atomic
from .stacked import stack_models
from .strategies import Strategy
from .train import (
    DivergenceError,
    Evaluations,
    Problem,
    RunResult,
    Schedule,
    TrainConfig,
    backward_and_step,
    batch_streams,
    build_optimizer,
    build_scheduler,
    forward_keeping,
    new_history,
)

Outcome = RunResult | DivergenceError


def batchable(problem: Problem, config: TrainConfig) -> bool:
    """Whether runs of this problem and config can be trained batched (else use `fit` one at a time)."""
    if config.hypergrad_method != "jvp":
        return False
    try:
        stack_models([problem.make_student(), problem.make_student()])
    except NotImplementedError:
        return False
    return True


@dataclass
class _Step:
    """A stacked step already taken, with what its per-run hypergradients need."""

    params: dict[str, Tensor]  # weights before the step
    buffers: dict[str, Tensor]
    x: Tensor
    y: Tensor
    teacher: Tensor
    lambda1: Tensor
    temperature: Tensor
    logits: Tensor
    record: ActivationRecord
    update: UpdateMap


def _per_run_val_gradient(model: nn.Module, x_val: Tensor, y_val: Tensor, t_val: float
                          ) -> tuple[dict[str, Tensor], Tensor]:
    leaves = {name: p.detach().requires_grad_() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    losses = per_run_validation_loss(functional_call(model, (leaves, buffers), (x_val,)), y_val, t_val)
    grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
    return dict(zip(leaves, grads)), losses.detach()


def per_run_hypergradients(model: nn.Module, step: _Step, x_val: Tensor, y_val: Tensor, t_val: float,
                           t2_scaling: bool) -> tuple[Tensor, Tensor]:
    """([R, 2] hypergradients, [R] validation losses at the new weights) of a stacked step, by the jvp
    method in the loop's shared ordering (see hypergrad.step_hypergradient, run by run)."""
    v, val_losses = _per_run_val_gradient(model, x_val, y_val, t_val)
    direction = step.update.apply(model, v)
    logits, tangent = logits_jvp(model, step.params, step.buffers, step.x, direction, step.record, step.logits)
    mixed = mixed_derivative(logits.detach(), step.teacher, step.y, step.lambda1.unsqueeze(-1),
                             step.temperature.unsqueeze(-1), t2_scaling)
    return -(mixed * tangent.unsqueeze(0)).sum(dim=(1, 3)).T, val_losses


@torch.no_grad()
def evaluate_runs(model: nn.Module, runs: int, x: Tensor, y: Tensor, t_val: float = 1.0,
                  batch_size: int = 2048) -> list[tuple[float, float]]:
    """Per run (accuracy, validation loss) of a stacked model in eval mode on shared data."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(runs, dtype=torch.long, device=x.device)
    loss_sum = torch.zeros(runs, dtype=torch.float64, device=x.device)
    chunk = max(1, batch_size // runs)
    for start in range(0, len(x), chunk):
        inputs = x[start:start + chunk]
        inputs = inputs.unsqueeze(1).expand(inputs.shape[0], runs, *inputs.shape[1:])
        target = y[start:start + chunk].unsqueeze(1).expand(-1, runs)
        logits = model(inputs.contiguous())
        correct += (logits.argmax(-1) == target).sum(0)
        loss_sum += per_run_validation_loss(logits, target, t_val).double() * len(target)
    model.train(was_training)
    return [(int(c) / len(x), float(s) / len(x)) for c, s in zip(correct.tolist(), loss_sum.tolist())]


def fit_batched(
    problem: Problem,
    strategies: list[Strategy],
    config: TrainConfig,
    seeds: list[int],
    progress: Callable[[int, int], None] | None = None,
    checkpoint: Path | None = None,
    identity: Any = None,
    checkpoint_every_s: float = 30.0,
) -> list[Outcome]:
    """`fit` for R = len(seeds) runs at once; outcome r is run r's RunResult, or its DivergenceError.

    With `checkpoint`, the whole state is saved there (atomically) at the end of an epoch once
    `checkpoint_every_s` seconds have passed since the last save, and an existing checkpoint of the
    same `identity` and seeds is resumed from, so an interrupted batch loses little. wall_s of each
    run is the batch's wall time (summed over resumptions) divided by R; extra holds batch_runs = R
    and batch_wall_s.
    """
    if len(strategies) != len(seeds) or not seeds:
        raise ValueError("fit_batched needs one strategy per seed, and at least one seed")
    if config.hypergrad_method != "jvp":
        raise ValueError("batched runs compute hypergradients by the jvp method only")
    started = time.perf_counter()
    runs = len(seeds)
    device = torch.device(config.device)
    problem = problem.to(device)
    students = []
    for seed in seeds:
        torch.manual_seed(seed)
        students.append(problem.make_student().to(device))
    model = stack_models(students)
    model.train()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    schedule = Schedule.of(config, len(problem.x_train))
    streams = [batch_streams(problem, config, seed, device) for seed in seeds]
    train_batches, val_batches = [train for train, _ in streams], [val for _, val in streams]

    lams: list[Metaparameters] = [s.start(seed) for s, seed in zip(strategies, seeds)]
    histories = [new_history() for _ in seeds]
    evaluations = [Evaluations(schedule.steps_per_epoch) for _ in seeds]
    hypergrad_evals = [0] * runs
    failed: list[str | None] = [None] * runs  # divergence messages
    first_step, earlier_wall = 0, 0.0
    last_saved = time.perf_counter()

    def state() -> dict:
        return {"identity": identity, "seeds": list(seeds), "step": step + 1, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "train_batches": [b.state_dict() for b in train_batches],
                "val_batches": [b.state_dict() for b in val_batches],
                "strategies": [s.state_dict() for s in strategies], "lams": [lam.as_tuple() for lam in lams],
                "histories": histories, "evals": [e.points for e in evaluations],
                "best": [(e.best_val, e.test_at_best) for e in evaluations], "hypergrad_evals": hypergrad_evals,
                "failed": failed, "wall_s": earlier_wall + time.perf_counter() - started}

    saved = _load_checkpoint(checkpoint, identity, seeds)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        for stream, stream_state in zip(train_batches + val_batches, saved["train_batches"] + saved["val_batches"]):
            stream.load_state_dict(stream_state)
        for strategy, strategy_state in zip(strategies, saved["strategies"]):
            strategy.load_state_dict(strategy_state)
        lams = [Metaparameters(*lam) for lam in saved["lams"]]
        histories = saved["histories"]
        evaluations = [Evaluations(schedule.steps_per_epoch, points, *best)
                       for points, best in zip(saved["evals"], saved["best"])]
        hypergrad_evals, failed = saved["hypergrad_evals"], saved["failed"]
        first_step, earlier_wall = saved["step"], saved["wall_s"]

    def record_eval(step: int) -> None:
        tests = evaluate_runs(model, runs, problem.x_test, problem.y_test, config.t_val)
        vals = evaluate_runs(model, runs, problem.x_val, problem.y_val, config.t_val)
        for r in range(runs):
            if failed[r] is None:
                evaluations[r].add(step, tests[r], vals[r], lams[r])

    for step in range(first_step, schedule.total_steps):
        index = torch.stack([next(batches) for batches in train_batches], dim=1)  # [B, R]
        for r in range(runs):
            histories[r]["lambda1"].append(lams[r].lambda1)
            histories[r]["temperature"].append(lams[r].temperature)
        wants = [failed[r] is None and strategies[r].wants_hypergradient(step) for r in range(runs)]
        lambda1 = torch.tensor([lam.lambda1 for lam in lams], device=device)
        temperature = torch.tensor([lam.temperature for lam in lams], device=device)
        x, y, teacher = problem.x_train[index], problem.y_train[index], problem.teacher_train[index]
        logits, kept = forward_keeping(model, x, any(wants))
        lambda1, temperature = lambda1.to(logits.dtype), temperature.to(logits.dtype)
        losses = per_run_distillation_loss(logits, teacher, y, lambda1, temperature, config.t2_scaling)
        update = backward_and_step(optimizer, losses.sum(), any(wants))
        loss_values = losses.detach().tolist()
        for r, value in enumerate(loss_values):
            if failed[r] is None and not math.isfinite(value):
                failed[r] = schedule.divergence(step, value, lams[r], optimizer.param_groups[0]["lr"])
                wants[r] = False
        for r in range(runs):
            histories[r]["train_loss"].append(loss_values[r])
            histories[r]["val_loss"].append(None)

        rows: list[list[float]] = []
        if any(wants):
            assert update is not None and kept is not None
            # Every run that wants the hypergradient draws its own validation batch, as `fit` does; the
            # others, computed alongside, borrow one and their rows are discarded.
            drawn = {r: next(val_batches[r]) for r in range(runs) if wants[r]}
            filler = next(iter(drawn.values()))
            v_index = torch.stack([drawn.get(r, filler) for r in range(runs)], dim=1)
            taken = _Step(*kept[:2], x, y, teacher, lambda1, temperature, logits, kept[2], update)
            h, val_losses = per_run_hypergradients(model, taken, problem.x_val[v_index], problem.y_val[v_index],
                                                   config.t_val, config.t2_scaling)
            rows = h.detach().cpu().tolist()
            for r, value in enumerate(val_losses.tolist()):
                if wants[r]:
                    histories[r]["val_loss"][-1] = value

        for r in range(runs):
            if failed[r] is not None:
                continue

            def hypergradient(r: int = r, wants: list[bool] = wants, rows: list[list[float]] = rows) -> Tensor:
                if not wants[r]:
                    raise RuntimeError("the strategy asked for a hypergradient at a step where it said it would not")
                hypergrad_evals[r] += 1
                return torch.tensor(rows[r], dtype=torch.float64)

            lams[r] = strategies[r].advance(step, hypergradient)
        if schedule.ends_epoch(step):
            scheduler.step()
        if schedule.evaluates(step):
            record_eval(step + 1)
        if (checkpoint is not None and schedule.ends_epoch(step) and step + 1 < schedule.total_steps
                and time.perf_counter() - last_saved >= checkpoint_every_s):
            buffer = io.BytesIO()
            torch.save(state(), buffer)
            write_atomic(checkpoint, buffer.getvalue())
            last_saved = time.perf_counter()
        if progress is not None:
            progress(step + 1, schedule.total_steps)
        if all(message is not None for message in failed):
            break

    wall = earlier_wall + time.perf_counter() - started
    outcomes: list[Outcome] = []
    for r in range(runs):
        message = failed[r]
        if message is not None:
            error = DivergenceError(message)
            error.wall_s = wall / runs
            outcomes.append(error)
            continue
        outcomes.append(evaluations[r].result(strategies[r].name, seeds[r], lams[r], schedule.total_steps,
                                              hypergrad_evals[r], wall / runs, histories[r],
                                              {"batch_runs": runs, "batch_wall_s": wall}))
    return outcomes


def _load_checkpoint(path: Path | None, identity: Any, seeds: list[int]) -> dict | None:
    """The checkpoint at `path` if it belongs to this batch (same identity and seeds), else None."""
    if path is None or not Path(path).exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a torn or foreign file: start the batch again
        return None
    if not isinstance(saved, dict) or saved.get("identity") != identity or saved.get("seeds") != list(seeds):
        return None
    return saved
