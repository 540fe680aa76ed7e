"""Data-parallel training (fit_ddp) on two gloo processes against the one-process fit."""

import dataclasses
import json
import math
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from metadistill.ddp import end_rank, fit_ddp, init_from_env
from metadistill.engine import fit
from metadistill.problem import Problem
from metadistill.results import DivergenceError
from metadistill.strategies import Gradient, MetaOptimizer
from metadistill.train import TrainConfig

WORLD = 2
SEED = 3
CONFIGS = {
    # 3 steps an epoch of 8 (4 + 4 per rank), validation batches of 6 (3 + 3); momentum SGD
    "sgd": TrainConfig(epochs=2, batch_size=8, val_batch_size=6, lr=0.5, momentum=0.9, eval_every=2),
    # unequal shards: batches 7, 7, 7, 3 (4 + 3, 2 + 1), validation 5, 5, 2 (3 + 2, 1 + 1); Adam
    "adam_uneven": TrainConfig(epochs=2, batch_size=7, val_batch_size=5, lr=0.05, optimizer="adam", t_val=0.5),
}


def _student() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _problem() -> Problem:
    """Random 3-class data in float64 (so that only summation order separates the runs)."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        return x, (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 1).long()

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = split(24), split(12), split(64)
    teacher = 3.0 * torch.nn.functional.one_hot(y_train, 3).double() + torch.randn(24, 3, generator=g,
                                                                                   dtype=torch.float64)
    return Problem(x_train, y_train, teacher, x_val, y_val, x_test, y_test, make_student=_student)


class RecordingGradient(Gradient):
    """The gradient method, keeping every hypergradient it is given."""

    def __init__(self) -> None:
        super().__init__(MetaOptimizer("sgd", meta_lr=0.1, clip=0), lambda1=0.5, temperature=2.0)
        self.seen: list[list[float]] = []

    def advance(self, step, hypergradient):
        def recorded():
            h = hypergradient()
            self.seen.append(h.tolist())
            return h

        return super().advance(step, recorded)


def _summary(result, strategy: RecordingGradient) -> dict:
    return {"history": result.history, "hypergradients": strategy.seen, "evals": result.evals,
            "final_test_acc": result.final_test_acc, "hypergrad_evals": result.hypergrad_evals,
            "steps": result.steps}


def _tape_only(*args, **kwargs):
    raise AssertionError("the tape JVP did not apply: DDP's forward did not feed the recorded chain")


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import metadistill.jvp

    metadistill.jvp.generic_jvp = _tape_only
    assert init_from_env("cpu") == (rank, WORLD)
    try:
        out = {}
        for name, config in CONFIGS.items():
            strategy = RecordingGradient()
            out[name] = _summary(fit_ddp(_problem(), strategy, config, SEED), strategy)
        broken = dataclasses.replace(_problem(), teacher_train=torch.full((24, 3), math.nan, dtype=torch.float64))
        try:
            fit_ddp(broken, RecordingGradient(), CONFIGS["sgd"], SEED)
        except DivergenceError as error:
            out["diverged"] = str(error)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()
    end_rank(0)  # as the CLI's ranks end (see end_rank); an error above still ends the process as a failure


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    context = mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP workers did not finish in 120 s")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_matches_single_process_fit(ranks, name):
    strategy = RecordingGradient()
    reference = _summary(fit(_problem(), strategy, CONFIGS[name], SEED), strategy)
    first, second = ranks[0][name], ranks[1][name]
    steps = reference["steps"]
    assert first["steps"] == steps and first["hypergrad_evals"] == steps == len(first["hypergradients"])
    # (a) every rank follows the same lambda, bit for bit, and sees the same reduced hypergradients
    for key in ("lambda1", "temperature"):
        assert first["history"][key] == second["history"][key]
    assert first["hypergradients"] == second["hypergradients"]
    assert first["history"] == second["history"] and first["evals"] == second["evals"]
    # (b) the hypergradient of the sharded step is the one-process hypergradient on the whole batch
    # (v all-reduced over the validation shards, the mixed product over the train shards)
    for got, want in zip(first["hypergradients"], reference["hypergradients"]):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert max(abs(h[0]) for h in reference["hypergradients"]) > 1e-3  # the test has teeth
    assert first["history"]["lambda1"][-1] != first["history"]["lambda1"][0]
    for key in ("lambda1", "temperature", "train_loss", "val_loss"):
        assert first["history"][key] == pytest.approx(reference["history"][key], rel=1e-9, abs=1e-12)
    # (c) the same model at the end: same evaluations, same final test accuracy
    assert first["final_test_acc"] == reference["final_test_acc"]
    for got, want in zip(first["evals"], reference["evals"], strict=True):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_ddp_divergence_is_raised_on_every_rank(ranks):
    assert all("diverged at step 0" in rank.get("diverged", "") for rank in ranks)


@pytest.mark.parametrize("method", ["fd", "double"])
def test_ddp_refuses_other_hypergradient_methods(method):
    config = dataclasses.replace(CONFIGS["sgd"], hypergrad_method=method)
    with pytest.raises(ValueError, match="only hypergrad_method 'jvp'"):
        fit_ddp(_problem(), RecordingGradient(), config, SEED)


def test_ddp_refuses_a_student_with_batchnorm():
    """Each rank would normalise with its own shard's statistics: not one-process training, so refused."""
    bn = dataclasses.replace(_problem(), make_student=lambda: nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double())
    with pytest.raises(ValueError, match="refuses students with BatchNorm"):
        fit_ddp(bn, RecordingGradient(), CONFIGS["sgd"], SEED)
