"""Data-parallel training of one student with greedy hypergradients on torch.distributed.

`fit_ddp` is `fit` (the same loop, `engine.train_runs`) with every global batch split across the
ranks of a process group (`DDPParallel`): each rank draws the same global batch indices as `fit`
(same generators), keeps its contiguous shard (`index.tensor_split(world)[rank]`), and
DistributedDataParallel averages the gradients. Each
rank's loss is weighted by its share of the global batch, so the averaged gradient is exactly the
gradient of the global-batch mean even when the shards are unequal.

The hypergradient is the "jvp" one (DDP cannot double-backward): v = grad L_val at the new weights
comes from a backward pass through the DDP module on the local validation shard, so DDP all-reduces
it into the global-validation-batch gradient; u = UpdateMap(optimizer) v; the mixed product is taken
on the local train shard with the recorded tape and only its two scalars [d lambda1, d T] (weighted
by the shard's share) are all-reduced. Every rank then runs the same strategy on the same h, so
lambda stays identical on every rank. Students with BatchNorm are refused: each rank would normalise
with its shard's statistics, which is not the one-process computation.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .engine import Parallel, train_runs
from .losses import validation_loss
from .problem import Problem
from .results import DivergenceError, RunResult
from .steps import Runs
from .strategies import Strategy
from .train import TrainConfig


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


@contextmanager
def process_group(device: str | torch.device = "cpu") -> Iterator[tuple[int, int]]:
    """`init_from_env` for a block: (rank, world_size) inside it; a group it created is destroyed at its end.
    Without that, a rank that finished first could abort at exit in gloo's threads ("terminate called without
    an active exception", SIGABRT) while another still worked, and torchrun then failed the launch."""
    owned = not dist.is_initialized()
    ranks = init_from_env(device)
    try:
        yield ranks
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def end_rank(code: int) -> NoReturn:
    """End this rank's process now with exit status `code`, its output flushed, without the interpreter's
    finalization. A rank that has finished (its process group destroyed) could still abort intermittently at
    exit, after Python had finalized ("terminate called without an active exception", SIGABRT: a C++ thread
    of the distributed runtime still joinable when static objects were destroyed, see pytorch/pytorch#190489),
    and torchrun then failed the whole launch; that was 1 launch in 5-10 of the CLI test's torchrun command
    here. Nothing of ours needs the finalization: records and checkpoints are written atomically and closed."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


def _all_sum(values: Tensor) -> Tensor:
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _shard(index: Tensor) -> tuple[Tensor, float]:
    """(this rank's contiguous chunk of a global batch, its share local/global of the batch)."""
    local = index.tensor_split(dist.get_world_size())[dist.get_rank()]
    if len(local) == 0:
        raise ValueError(f"a global batch of {len(index)} samples leaves rank {dist.get_rank()} of "
                         f"{dist.get_world_size()} without data; use larger batches or fewer ranks")
    return local, len(local) / len(index)


class DDPParallel(Parallel):
    """The training loop's batches split across the ranks of the process group (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ddp: DistributedDataParallel | None = None
        self.train_share = self.val_share = 1.0

    def shard(self, index: Tensor) -> Tensor:
        local, self.train_share = _shard(index)
        return local

    def forward(self, model: nn.Module) -> DistributedDataParallel:
        if self.ddp is None:
            self.ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None)
        return self.ddp

    def loss_weight(self) -> float:
        # DDP averages over ranks: sum_r (share_r * world * mean_r) / world is the global-batch mean.
        return self.train_share * dist.get_world_size()

    def loss_values(self, losses: Tensor) -> list[float]:
        return _all_sum(losses * self.train_share).tolist()

    def shard_validation(self, index: Tensor) -> Tensor:
        local, self.val_share = _shard(index)
        return local

    def validation_gradient(self, model: nn.Module, runs: Runs, x_val: Tensor, y_val: Tensor, t_val: float
                            ) -> tuple[dict[str, Tensor], Tensor]:
        """(grad_w of the global validation-batch mean, this rank's weighted share of that mean).

        The backward pass goes through the DDP module into .grad, so DDP all-reduces the gradient; the
        gradients are read and cleared, and the buffers (BatchNorm statistics) are restored.
        """
        ddp = self.forward(model)
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        model.zero_grad(set_to_none=True)
        loss = validation_loss(ddp(x_val), y_val, t_val)
        (loss * (self.val_share * dist.get_world_size())).backward()
        v = {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
             for name, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        return v, (loss.detach() * self.val_share).reshape(1)

    def reduce(self, hypergradients: Tensor, val_losses: Tensor) -> tuple[Tensor, Tensor]:
        """The global-batch hypergradient: each rank's mixed product is of its train shard's mean loss."""
        local = hypergradients.reshape(-1) * self.train_share
        reduced = _all_sum(torch.cat([local, val_losses.to(local.dtype)]))
        return reduced[:2].reshape(1, 2), reduced[2:]

    def facts(self) -> dict[str, int]:
        return {"world_size": dist.get_world_size()}


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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
    rank. Only hypergrad_method "jvp" and the greedy hypergradient are supported, and students with
    BatchNorm are refused (each rank would normalise with its own shard's statistics, which is not
    one-process training). A cuda `config.device` without an index means the current device (see
    `init_from_env`). Raises DivergenceError on every rank alike when the global training loss
    becomes non-finite.
    """
    if config.hypergrad_method != "jvp":
        raise ValueError(f"fit_ddp supports only hypergrad_method 'jvp', not {config.hypergrad_method!r} "
                         "(DistributedDataParallel cannot double-backward)")
    if getattr(strategy, "horizon", None) is not None:
        raise ValueError("fit_ddp computes the greedy hypergradient only, not the online one")
    if _has_batchnorm(problem.make_student()):
        raise ValueError("fit_ddp refuses students with BatchNorm layers: each rank would normalise with its own "
                         "shard's statistics, which differs from one-process training (train them without --ddp)")
    if not isinstance(problem, Problem):
        raise ValueError("fit_ddp trains from a Problem in memory (each rank draws fit's batches and keeps its shard)")
    if not dist.is_initialized():
        raise RuntimeError("fit_ddp needs an initialised torch.distributed process group (see init_from_env)")
    device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    outcome = train_runs(problem, [strategy], config, [seed], progress, parallel=DDPParallel(device))[0]
    if isinstance(outcome, DivergenceError):
        raise outcome
    return outcome
