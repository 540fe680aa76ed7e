"""Training from DataLoaders: the same runs as in memory, a live teacher, augmentation seen by the teacher."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from metadistill import Gradient, Loaders, Metaparameters, hyperopt_search
from metadistill.engine import fit, fit_batched
from metadistill.pbt import pbt_search
from metadistill.problem import IndexStream, Problem
from metadistill.strategies import Fixed, MetaOptimizer
from metadistill.train import TrainConfig

# One evaluation, after the last step: evaluating iterates the validation loader, which would move the sampler
# that mirrors the in-memory validation stream.
CONFIG = TrainConfig(epochs=2, batch_size=8, lr=0.3, momentum=0.5, eval_every=10)


pytestmark = pytest.mark.usefixtures("float64")


def student():
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def teacher():
    torch.manual_seed(99)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return x[:40], y[:40], x[40:64], y[40:64], x[64:], y[64:]


class SeededBatches:
    """A batch sampler drawing exactly what the in-memory source draws for a run (IndexStream's permutations)."""

    def __init__(self, n, size, seed):
        self.stream, self.per_pass = IndexStream(n, size, seed, torch.device("cpu")), -(-n // size)

    def __iter__(self):
        return (next(self.stream).tolist() for _ in range(self.per_pass))

    def __len__(self):
        return self.per_pass


def loaders(seed, teacher_source, transform=None):
    x, y, xv, yv, xt, yt = data()
    train = DataLoader(TensorDataset(x, y, torch.arange(len(x))), batch_sampler=SeededBatches(len(x), 8, 2 * seed),
                       collate_fn=transform)
    val = DataLoader(TensorDataset(xv, yv), batch_sampler=SeededBatches(len(xv), 8, 2 * seed + 1))
    test = DataLoader(TensorDataset(xt, yt), batch_size=11)
    return Loaders(train, val, test, teacher_source, student)


def strategy():
    return Gradient(MetaOptimizer("sgd", 0.5, 0.0), lambda1=0.5, temperature=2.0)


@pytest.mark.parametrize("live", [False, True])
def test_fit_from_loaders_equals_fit_in_memory(live):
    x, y, xv, yv, xt, yt = data()
    model = teacher()
    with torch.no_grad():
        logits = model.eval()(x)
    memory = fit(Problem(x, y, logits, xv, yv, xt, yt, student), strategy(), CONFIG, seed=3)
    streamed = fit(loaders(3, model if live else logits), strategy(), CONFIG, seed=3)
    for key in ("lambda1", "temperature", "train_loss"):
        np.testing.assert_allclose(streamed.history[key], memory.history[key], rtol=1e-10, atol=1e-13, err_msg=key)
    assert [e["test_acc"] for e in streamed.evals] == [e["test_acc"] for e in memory.evals]
    # (validation accuracy is not compared: the mirroring sampler does not make one clean pass over the split)
    assert streamed.hypergrad_evals == memory.hypergrad_evals > 0


def test_the_live_teacher_sees_the_augmented_batch_the_student_sees():
    seen = {"teacher": [], "student": []}
    model = teacher()
    model.register_forward_pre_hook(lambda module, args: seen["teacher"].append(args[0].clone()))
    generator = torch.Generator().manual_seed(5)

    def augment(samples):  # a random perturbation per batch, drawn in the loader
        x, y, index = (torch.stack(parts) for parts in zip(*samples))
        return x + 0.3 * torch.randn(x.shape, generator=generator), y, index

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = student()

        def forward(self, x):
            if self.training:
                seen["student"].append(x.clone())
            return self.inner(x)

    source = dataclasses.replace(loaders(1, model, augment), make_student=Recording)
    fit(source, Gradient(lambda1=0.5, temperature=2.0), dataclasses.replace(CONFIG, epochs=1), seed=1)
    train_inputs = [t for t in seen["student"] if t.shape[0] == 8 or t.shape[0] == 40 % 8]
    assert len(seen["teacher"]) == 5 and len(train_inputs) >= 5
    x = data()[0]
    for teacher_input in seen["teacher"]:
        assert any(torch.equal(teacher_input, s) for s in seen["student"])  # the very batch the student trained on
        assert not any(torch.equal(teacher_input, x[i:i + len(teacher_input)]) for i in range(len(x)))  # augmented


def test_batched_runs_and_hyperopt_from_loaders():
    model = teacher()
    outcomes = fit_batched(loaders(0, model), [strategy() for _ in range(2)], CONFIG, [0, 1])
    assert all(o.steps == 10 for o in outcomes) and outcomes[0].history["train_loss"] != outcomes[1].history[
        "train_loss"]  # the same batches, different initial weights
    result = hyperopt_search(loaders(0, model), CONFIG, seed=0, trials=2)
    assert result.full_trainings == 3 and result.steps == 30
    with pytest.raises(ValueError, match="cannot checkpoint"):
        fit_batched(loaders(0, model), [strategy()], CONFIG, [0], checkpoint="/tmp/x.ckpt")
    with pytest.raises(ValueError, match="pbt copies members' states.*cannot checkpoint"):  # before Ray starts
        pbt_search(loaders(0, model), CONFIG, seed=0, population=2)


def test_without_distillation_the_teacher_is_not_run():
    """At lambda1 = 1 the loss is the hard-label term alone: the live teacher costs nothing, the run is the same."""
    x, y, xv, yv, xt, yt = data()
    model, calls = teacher(), []
    with torch.no_grad():
        logits = model.eval()(x)
    model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    hard_only = Fixed(Metaparameters(1.0, 1.0), "no_distillation")
    memory = fit(Problem(x, y, logits, xv, yv, xt, yt, student), hard_only, CONFIG, seed=3)
    streamed = fit(loaders(3, model), hard_only, CONFIG, seed=3)
    assert calls == [] and streamed.steps == memory.steps == 10
    np.testing.assert_allclose(streamed.history["train_loss"], memory.history["train_loss"], rtol=1e-12)
    fit(loaders(3, model), Fixed(Metaparameters(0.5, 2.0), "naive"), CONFIG, seed=3)
    assert calls == [8, 8, 8, 8, 8] * 2  # a distilling run runs it on each train batch
