"""Data-parallel training of one student with greedy hypergradients on torch.distributed.

`fit_ddp` is `fit` with every global batch split across the ranks of a process group: each rank
draws the same global batch indices as `fit` (same generators), keeps its contiguous shard
(`index.tensor_split(world)[rank]`), and DistributedDataParallel averages the gradients. Each
rank's loss is weighted by its share of the global batch, so the averaged gradient is exactly the
gradient of the global-batch mean even when the shards are unequal.

The hypergradient is the "jvp" one (DDP cannot double-backward): v = grad L_val at the new weights
comes from a backward pass through the DDP module on the local validation shard, so DDP all-reduces
it into the global-validation-batch gradient; u = UpdateMap(optimizer) v; the mixed product is taken
on the local train shard with the recorded tape and only its two scalars [d lambda1, d T] (weighted
by the shard's share) are all-reduced. Every rank then runs the same strategy on the same h, so
lambda stays identical on every rank.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .hypergrad import TrainStep, UpdateMap, mixed_product
from .jvp import record_activations
from .losses import distillation_loss, validation_loss
from .meta import Metaparameters
from .strategies import Strategy
from .train import (
    DivergenceError,
    Problem,
    RunResult,
    TakenStep,
    TrainConfig,
    _batches,
    _refuse,
    build_optimizer,
    evaluate,
)


def init_from_env(device: str | torch.device = "cpu") -> tuple[int, int]:
    """Initialise the default process group from torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.

    Backend nccl for a cuda device (which also selects GPU LOCAL_RANK as the current device), gloo
    otherwise. Returns (rank, world_size); an already initialised group is kept as it is.
    """
    device = torch.device(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world)
    return dist.get_rank(), dist.get_world_size()


def _shard(index: Tensor) -> tuple[Tensor, float]:
    """(this rank's contiguous chunk of a global batch, its share local/global of the batch)."""
    local = index.tensor_split(dist.get_world_size())[dist.get_rank()]
    if len(local) == 0:
        raise ValueError(f"a global batch of {len(index)} samples leaves rank {dist.get_rank()} of "
                         f"{dist.get_world_size()} without data; use larger batches or fewer ranks")
    return local, len(local) / len(index)


def _all_sum(values: Tensor) -> Tensor:
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _ddp_train_step(ddp: DistributedDataParallel, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                    teacher: Tensor, share: float, lam: Metaparameters, t2_scaling: bool = False,
                    keep_for_hypergradient: bool = False) -> tuple[float, TakenStep | None]:
    """`train.train_step` on this rank's shard; returns the global-batch mean loss (the same on every rank).

    A non-finite global loss is returned without stepping (on every rank alike).
    """
    module = ddp.module
    if keep_for_hypergradient:
        params = {name: p.detach().clone() for name, p in module.named_parameters()}
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        with record_activations(module) as record:
            logits = ddp(x)
    else:
        logits = ddp(x)
    loss = distillation_loss(logits, teacher, y, lam.lambda1, lam.temperature, t2_scaling)
    loss_value = float(_all_sum(loss * share))
    if not math.isfinite(loss_value):
        return loss_value, None
    optimizer.zero_grad(set_to_none=True)
    # DDP averages over ranks: sum_r (share_r * world * mean_r) / world is the global-batch mean.
    (loss * (share * dist.get_world_size())).backward()
    if not keep_for_hypergradient:
        optimizer.step()
        return loss_value, None
    update = UpdateMap(optimizer)
    optimizer.step()
    return loss_value, TakenStep(TrainStep(module, params, buffers, x, y, teacher, lam, t2_scaling, logits, record),
                                 update)


def _ddp_validation_gradient(ddp: DistributedDataParallel, x_val: Tensor, y_val: Tensor, share: float,
                             t_val: float = 1.0) -> tuple[dict[str, Tensor], Tensor]:
    """(grad_w of the global validation-batch mean, this rank's weighted share of that mean).

    The backward pass goes through the DDP module into .grad, so DDP all-reduces the gradient; the
    gradients are read and cleared, and the buffers (BatchNorm statistics) are restored.
    """
    module = ddp.module
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    module.zero_grad(set_to_none=True)
    loss = validation_loss(ddp(x_val), y_val, t_val)
    (loss * (share * dist.get_world_size())).backward()
    v = {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
         for name, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name])
    return v, loss.detach() * share


def _ddp_hypergradient(ddp: DistributedDataParallel, taken: TakenStep, share: float, x_val: Tensor,
                       y_val: Tensor, val_share: float, t_val: float = 1.0) -> tuple[Tensor, float]:
    """(h, L_val(w')) of a step already taken, for the global batches; the same on every rank."""
    v, val_part = _ddp_validation_gradient(ddp, x_val, y_val, val_share, t_val)
    local = mixed_product(taken.step, taken.update.apply(ddp.module, v), "jvp") * share
    reduced = _all_sum(torch.cat([local, val_part.reshape(1).to(local.dtype)]))
    return -reduced[:2], float(reduced[2])


def fit_ddp(
    problem: Problem,
    strategy: Strategy,
    config: TrainConfig,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """`fit` on every rank of an initialised process group, each rank training on its shard of fit's batches.

    Call it on every rank with the same arguments; every rank returns the same RunResult (history
    losses are global-batch means; evaluations use the full sets). `progress` is called on every
    rank. Only hypergrad_method "jvp" is supported. A cuda `config.device` without an index means
    the current device (see `init_from_env`). Raises DivergenceError on every rank alike when the
    global training loss becomes non-finite.
    """
    if config.hypergrad_method != "jvp":
        raise ValueError(f"fit_ddp supports only hypergrad_method 'jvp', not {config.hypergrad_method!r} "
                         "(DistributedDataParallel cannot double-backward)")
    if not dist.is_initialized():
        raise RuntimeError("fit_ddp needs an initialised torch.distributed process group (see init_from_env)")
    started = time.perf_counter()
    device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    problem = problem.to(device)
    torch.manual_seed(seed)
    module: nn.Module = problem.make_student().to(device)
    module.train()
    ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(module, config)
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
        test_acc, test_loss = evaluate(module, problem.x_test, problem.y_test, config.t_val)
        val_acc, val_loss = evaluate(module, problem.x_val, problem.y_val, config.t_val)
        if val_acc > best_val:
            best_val, test_at_best = val_acc, test_acc
        evals.append({"step": step, "epoch": step / steps_per_epoch, "test_acc": test_acc,
                      "test_loss": test_loss, "val_acc": val_acc, "val_loss": val_loss,
                      "lambda1": lam.lambda1, "temperature": lam.temperature})

    for step in range(total_steps):
        index, share = _shard(next(train_batches))
        history["lambda1"].append(lam.lambda1)
        history["temperature"].append(lam.temperature)
        wants = strategy.wants_hypergradient(step)
        loss_value, taken = _ddp_train_step(ddp, optimizer, problem.x_train[index], problem.y_train[index],
                                            problem.teacher_train[index], share, lam, config.t2_scaling, wants)
        if not math.isfinite(loss_value):
            raise DivergenceError(
                f"training diverged at step {step} (epoch {step // steps_per_epoch}): loss {loss_value} "
                f"with lambda1={lam.lambda1:.4g}, T={lam.temperature:.4g}, lr={optimizer.param_groups[0]['lr']:.4g}")
        history["train_loss"].append(loss_value)
        history["val_loss"].append(None)

        def hypergradient(taken: TakenStep | None = taken, share: float = share) -> Tensor:
            nonlocal hypergrad_evals
            assert taken is not None
            hypergrad_evals += 1
            v_index, v_share = _shard(next(val_batches))
            h, val_loss = _ddp_hypergradient(ddp, taken, share, problem.x_val[v_index], problem.y_val[v_index],
                                             v_share, config.t_val)
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
        full_trainings=1, wall_s=time.perf_counter() - started, history=history, evals=evals,
        extra={"world_size": dist.get_world_size()})
