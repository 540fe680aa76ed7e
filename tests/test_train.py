"""The training loop and the hyperopt baseline on the synthetic task (short runs)."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from metadistill import Gradient
from metadistill.config import build_config
from metadistill.data.synthetic import SPLITS, STUDENT_FEATURES, synthetic_problem
from metadistill.engine import Engine, Parallel, fit
from metadistill.problem import Problem
from metadistill.results import DivergenceError
from metadistill.search import hyperopt_search
from metadistill.train import TrainConfig

SHORT = TrainConfig(epochs=60, batch_size=0, lr=1.0, t_val=0.1, eval_every=20)


@pytest.fixture(scope="module")
def problem():
    problem, teacher_acc = synthetic_problem(0, 3000, 0.01)
    return problem


def test_synthetic_splits_and_features(problem):
    assert len(problem.x_train) == SPLITS["train"] and len(problem.x_val) == SPLITS["val"]
    assert len(problem.x_test) == SPLITS["test"]
    assert problem.x_train.shape[1] == len(STUDENT_FEATURES)
    # the validation points are not test points (the original validated on the test set)
    assert not any(torch.equal(v, t) for v in problem.x_val for t in problem.x_test)
    assert problem.teacher_train.shape == (SPLITS["train"], 2)


def test_the_synthetic_teacher_is_plain_sgd_to_the_bit():
    import torch.nn.functional as F

    from metadistill.data.synthetic import TEACHER_FEATURES, sample
    from metadistill.models import logistic_regression
    problem, _ = synthetic_problem(3, 500, 0.05)
    generator = torch.Generator().manual_seed(3)
    parts = {name: sample(n, generator) for name, n in SPLITS.items()}
    torch.manual_seed(3)
    teacher = logistic_regression(len(TEACHER_FEATURES), 2)
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.05)
    for _ in range(500):
        optimizer.zero_grad()
        F.cross_entropy(teacher(parts["teacher"][0][:, TEACHER_FEATURES]), parts["teacher"][1]).backward()
        optimizer.step()
    with torch.no_grad():
        assert torch.equal(teacher(parts["train"][0][:, TEACHER_FEATURES]), problem.teacher_train)


@pytest.mark.parametrize("method", ["no_distillation", "naive", "random", "gradient", "proposed"])
def test_fit_is_seeded_and_counts_cost(problem, method):
    config = build_config("synthetic", ["epochs=60", "eval_every=20", "window=4", "period=3"])
    first = fit(problem, config.strategy(method), SHORT, seed=4)
    again = fit(problem, config.strategy(method), SHORT, seed=4)
    assert first.history == again.history and first.final_test_acc == again.final_test_acc
    assert first.steps == 60 and len(first.history["lambda1"]) == 60
    assert [e["step"] for e in first.evals] == [20, 40, 60]
    expected = {"gradient": 60, "proposed": sum(1 for t in range(60) if (t // 4) % 3 == 0)}.get(method, 0)
    assert first.hypergrad_evals == expected
    assert sum(v is not None for v in first.history["val_loss"]) == expected
    assert 0.0 <= first.final_test_acc <= 1.0


def test_gradient_method_moves_lambda_and_other_seeds_differ(problem):
    config = build_config("synthetic", [])
    a = fit(problem, config.strategy("gradient"), SHORT, seed=0)
    b = fit(problem, config.strategy("gradient"), SHORT, seed=1)
    assert a.history["lambda1"][0] != a.history["lambda1"][-1]
    assert a.history["lambda1"] != b.history["lambda1"]


def test_divergence_is_reported(problem):
    broken = dataclasses.replace(problem, teacher_train=torch.full_like(problem.teacher_train, math.nan))
    config = build_config("synthetic", [])
    with pytest.raises(DivergenceError, match="diverged at step 0"):
        fit(broken, config.strategy("naive"), SHORT, seed=0)


def test_hyperopt_budget_and_validation_only_choice(problem):
    result = hyperopt_search(problem, SHORT, seed=2, trials=3)
    trials = result.extra["trials"]
    assert len(trials) == 3 and result.full_trainings == 4
    assert result.steps == 4 * SHORT.epochs
    best = max(trials, key=lambda t: t["val_acc"])
    assert (result.final_lambda1, result.final_temperature) == (best["lambda1"], best["temperature"])
    # deterministic training: the final training reproduces the chosen trial's validation score
    assert result.final_val_acc == best["val_acc"]
    again = hyperopt_search(problem, SHORT, seed=2, trials=3)
    assert again.extra["trials"] == [{**t, "wall_s": a["wall_s"]} for t, a in zip(trials, again.extra["trials"])]


def test_hyperopt_skips_diverging_trials(problem, monkeypatch):
    import metadistill.search as search

    real_fit_batched = search.fit_batched
    calls = []

    def sometimes_diverging(problem, strategies, config, seeds, *args):
        calls.append(strategies[0].fixed)
        if len(calls) % 2 == 1:
            return [DivergenceError("training diverged at step 3")]
        return real_fit_batched(problem, strategies, config, seeds, *args)

    monkeypatch.setattr(search, "fit_batched", sometimes_diverging)
    result = hyperopt_search(problem, SHORT, seed=1, trials=3)
    trials = result.extra["trials"]
    assert [t["val_acc"] is None for t in trials] == [True, False, True]
    assert (result.final_lambda1, result.final_temperature) == (trials[1]["lambda1"], trials[1]["temperature"])

    monkeypatch.setattr(search, "fit_batched", lambda *a, **k: [DivergenceError("boom")])
    with pytest.raises(DivergenceError, match="all 2 hyperopt trials diverged"):
        hyperopt_search(problem, SHORT, seed=1, trials=2)


@pytest.mark.usefixtures("float64")
def test_a_single_cnn_student_trains_channels_last_with_the_same_numbers():
    def cnn():
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(3 * 3 * 3, 4))

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 2, 8, 8, generator=g), torch.randint(0, 4, (60,), generator=g)
    problem = Problem(x[:40], y[:40], torch.randn(40, 4, generator=g), x[40:50], y[40:50], x[50:], y[50:], cnn)
    config = TrainConfig(epochs=3, batch_size=10, lr=0.5)
    results = {}
    for channels_last in (True, False):
        setting = dataclasses.replace(config, channels_last=channels_last)
        engine = Engine(problem, [Gradient(lambda1=0.5, temperature=2.0)], setting, [0], Parallel())
        assert engine.model[0].weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        results[channels_last] = fit(problem, Gradient(lambda1=0.5, temperature=2.0), setting, seed=0)
    for key in ("lambda1", "temperature", "train_loss", "val_loss"):
        assert results[True].history[key] == pytest.approx(results[False].history[key], rel=1e-9), key
    assert results[True].history["lambda1"][-1] != 0.5  # the hypergradients moved lambda
