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

from .hypergrad import mixed_product
from .losses import distillation_loss, validation_loss
from .meta import Metaparameters
from .strategies import Strategy
from .train import (
    Problem,
    RunResult,
    TakenStep,
    TrainConfig,
    build_optimizer,
    forward_keeping,
    optimizer_step,
    run_loop,
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
    logits, kept = forward_keeping(module, x, keep_for_hypergradient, ddp)
    loss = distillation_loss(logits, teacher, y, lam.lambda1, lam.temperature, t2_scaling)
    loss_value = float(_all_sum(loss * share))
    if not math.isfinite(loss_value):
        return loss_value, None
    # DDP averages over ranks: sum_r (share_r * world * mean_r) / world is the global-batch mean.
    scaled = loss * (share * dist.get_world_size())
    return loss_value, optimizer_step(module, optimizer, scaled, kept, x, y, teacher, lam, t2_scaling, logits)


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

    train_share = 1.0  # the share of the last step's train shard, for its hypergradient's all-reduce

    def take_step(index: Tensor, lam: Metaparameters, wants: bool) -> tuple[float, TakenStep | None]:
        nonlocal train_share
        local, train_share = _shard(index)
        return _ddp_train_step(ddp, optimizer, problem.x_train[local], problem.y_train[local],
                               problem.teacher_train[local], train_share, lam, config.t2_scaling, wants)

    def hypergradient_of(taken: TakenStep, v_index: Tensor) -> tuple[Tensor, float]:
        local, v_share = _shard(v_index)
        return _ddp_hypergradient(ddp, taken, train_share, problem.x_val[local], problem.y_val[local], v_share,
                                  config.t_val)

    result = run_loop(problem, strategy, config, seed, module, optimizer, take_step, hypergradient_of, progress,
                      started)
    result.extra["world_size"] = dist.get_world_size()
    return result
