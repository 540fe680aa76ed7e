"""Batched runs are the same computation as one-at-a-time runs: every strategy, hyperopt, divergence, resume."""

import dataclasses
import json
import math
import time

import pytest
import torch
from torch import nn

from metadistill.config import build_config
from metadistill.data.synthetic import synthetic_problem
from metadistill.engine import batchable, fit, fit_batched
from metadistill.models import fashion_student, logistic_regression
from metadistill.problem import IndexStream, Problem
from metadistill.results import DivergenceError
from metadistill.search import hyperopt_search_batched
from metadistill.stacked import stack_models
from metadistill.steps import Runs, validation_gradient
from metadistill.strategies import Gradient, MetaOptimizer
from metadistill.train import TrainConfig

SEEDS = [0, 1, 2]


def image_problem(n_train=64, n_val=32, n_test=32, make_student=fashion_student) -> Problem:
    g = torch.Generator().manual_seed(0)
    dtype = torch.get_default_dtype()

    def split(n):
        return torch.randn(n, 1, 28, 28, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)

    (xt, yt), (xv, yv), (xs, ys) = split(n_train), split(n_val), split(n_test)
    return Problem(xt, yt, 3 * torch.randn(n_train, 10, generator=g, dtype=dtype), xv, yv, xs, ys, make_student)


IMAGE = TrainConfig(epochs=2, batch_size=16, lr=0.1, eval_every=3, t_val=1.0)
SYNTHETIC = TrainConfig(epochs=40, batch_size=0, lr=1.0, t_val=0.1, eval_every=10)


def strategy(name: str):
    config = build_config("synthetic", ["window=3", "period=2", "meta_clip=0"])  # no clip: h moves lambda
    if name == "gradient-adam":
        return Gradient(MetaOptimizer("adam", 0.05))
    return config.strategy(name)


def assert_same_runs(singles, batched):
    for single, batch in zip(singles, batched):
        assert not isinstance(batch, DivergenceError)
        assert batch.seed == single.seed and batch.steps == single.steps
        assert batch.hypergrad_evals == single.hypergrad_evals
        for key in ("lambda1", "temperature", "train_loss"):
            assert batch.history[key] == pytest.approx(single.history[key], rel=1e-9, abs=1e-12), key
        assert [v is None for v in batch.history["val_loss"]] == [v is None for v in single.history["val_loss"]]
        assert [v for v in batch.history["val_loss"] if v is not None] == pytest.approx(
            [v for v in single.history["val_loss"] if v is not None], rel=1e-9)
        assert [e["step"] for e in batch.evals] == [e["step"] for e in single.evals]
        for a, b in zip(single.evals, batch.evals):
            assert (a["test_acc"], a["val_acc"]) == (b["test_acc"], b["val_acc"])
            assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-9)
        assert (batch.final_test_acc, batch.best_val_acc, batch.test_acc_at_best_val) == (
            single.final_test_acc, single.best_val_acc, single.test_acc_at_best_val)


@pytest.mark.parametrize("name", ["no_distillation", "naive", "random", "gradient", "gradient-adam", "proposed"])
def test_batched_equals_one_at_a_time_on_a_cnn_with_batchnorm(float64, name):
    problem = image_problem()
    singles = [fit(problem, strategy(name), IMAGE, seed) for seed in SEEDS]
    batched = fit_batched(problem, [strategy(name) for _ in SEEDS], IMAGE, SEEDS)
    assert_same_runs(singles, batched)
    assert all(b.extra["batch_runs"] == len(SEEDS) for b in batched)
    if name.startswith("gradient") or name == "proposed":
        assert len(set(batched[0].history["lambda1"])) > 2  # the hypergradient really moved lambda


@pytest.fixture(scope="module")
def synthetic():
    problem, _ = synthetic_problem(0, 500, 0.01)  # built in float32, before any test switches the default
    return problem


@pytest.mark.parametrize("name", ["naive", "random", "gradient", "proposed"])
def test_batched_equals_one_at_a_time_on_the_synthetic_task(synthetic, float64, name):
    problem = dataclasses.replace(synthetic, **{k: getattr(synthetic, k).double() for k in
                                                ("x_train", "teacher_train", "x_val", "x_test")})
    singles = [fit(problem, strategy(name), SYNTHETIC, seed) for seed in SEEDS]
    assert_same_runs(singles, fit_batched(problem, [strategy(name) for _ in SEEDS], SYNTHETIC, SEEDS))


def test_float32_batched_runs_agree_to_float_tolerance():
    problem = image_problem()
    singles = [fit(problem, strategy("gradient"), IMAGE, seed) for seed in SEEDS]
    batched = fit_batched(problem, [strategy("gradient") for _ in SEEDS], IMAGE, SEEDS)
    for single, batch in zip(singles, batched):
        assert batch.history["temperature"] == pytest.approx(single.history["temperature"], rel=1e-4)
        # float32 sums in another order (a grouped against a plain convolution; the thread count) drift as the
        # students train: 1.1e-4 relative at step 6 of 8, measured with one thread
        assert batch.history["train_loss"] == pytest.approx(single.history["train_loss"], rel=5e-4)


def test_stacked_model_is_the_models_side_by_side():
    torch.manual_seed(0)
    models = [fashion_student() for _ in range(3)]
    stacked = stack_models(models)
    x = torch.randn(5, 3, 1, 28, 28)
    expected = torch.stack([m(x[:, r]) for r, m in enumerate(models)], dim=1)
    torch.testing.assert_close(stacked(x), expected, rtol=1e-5, atol=1e-5)
    linear = [logistic_regression(3) for _ in range(4)]
    x = torch.randn(7, 4, 3)
    torch.testing.assert_close(stack_models(linear)(x), torch.stack([m(x[:, r]) for r, m in enumerate(linear)], 1))


def test_unsupported_models_fall_back_to_one_at_a_time():
    with pytest.raises(NotImplementedError, match="Dropout"):
        stack_models([nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)) for _ in range(2)])
    dropout = dataclasses.replace(image_problem(), make_student=lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(784, 10), nn.Dropout(0.5)))
    assert not batchable(dropout, IMAGE)
    assert batchable(image_problem(), IMAGE)
    assert not batchable(image_problem(), dataclasses.replace(IMAGE, hypergrad_method="fd"))


def test_stacked_tape_jvp_equals_forward_mode_and_per_run_hypergradients(float64, tape_and_forward_mode):
    """The per-run hypergradient of a stacked step is each run's own (tape and generic JVP agree)."""
    problem = image_problem()
    torch.manual_seed(3)
    models = [fashion_student() for _ in SEEDS]
    stacked = stack_models(models)
    x = problem.x_train[:16].unsqueeze(1).expand(-1, 3, -1, -1, -1).contiguous()
    _, tape, _, expected = tape_and_forward_mode(stacked, x)
    torch.testing.assert_close(tape, expected, rtol=1e-9, atol=1e-10)
    # against the validation gradient of each run alone
    v_val = problem.x_val[:8]
    grads = [validation_gradient(m, Runs(), v_val, problem.y_val[:8])[0] for m in models]
    stacked_grads, _ = validation_gradient(stacked, Runs(3, stacked=True), Runs(3, True).shared(v_val),
                                           problem.y_val[:8].unsqueeze(1).expand(-1, 3), 1.0)
    first_conv = stacked_grads["1.weight"].view(3, 8, 1, 3, 3)
    for r in range(3):
        torch.testing.assert_close(first_conv[r], grads[r]["0.weight"])


def reference_batches(n, size, seed):
    """The specified sequence: a fresh seeded permutation per pass, split into `size` (0 or >= n: whole)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        yield from [order] if size <= 0 or size >= n else order.split(size)


def test_index_stream_draws_the_specified_batches_and_resumes():
    for n, size in ((10, 3), (10, 0), (10, 20), (128, 16)):
        stream = IndexStream(n, size, 7, torch.device("cpu"))
        reference = reference_batches(n, size, 7)
        for _ in range(9):
            assert torch.equal(next(stream), next(reference))
        copy = IndexStream(n, size, 0, torch.device("cpu"))
        copy.load_state_dict(stream.state_dict())
        for _ in range(5):
            assert torch.equal(next(copy), next(stream))


def test_tpe_search_asks_the_points_fmin_would_try():
    """The ask/tell driver makes hyperopt's own choices: the same points as fmin with the same seed and scores."""
    import numpy as np
    from hyperopt import STATUS_OK, Trials, fmin, tpe

    from metadistill.search import TPESearch, space

    def score(lambda1, log10_temperature):  # any deterministic objective; failures every third trial
        return None if round(lambda1 * 1000) % 3 == 0 else -((lambda1 - 0.3) ** 2) - (log10_temperature - 0.2) ** 2

    for seed in (0, 5):
        seen = []

        def objective(point, seen=seen):
            seen.append((point["lambda1"], point["log10_temperature"]))
            value = score(point["lambda1"], point["log10_temperature"])
            return {"status": "fail"} if value is None else {"loss": -value, "status": STATUS_OK}

        fmin(objective, space(), algo=tpe.suggest, max_evals=25, trials=Trials(), rstate=np.random.default_rng(seed),
             show_progressbar=False)
        search = TPESearch(seed)
        for expected in seen:
            lam = search.ask()
            assert lam.lambda1 == pytest.approx(expected[0], abs=1e-12)
            assert lam.temperature == pytest.approx(10.0 ** expected[1], rel=1e-12)
            search.tell(score(*expected))


def test_batched_hyperopt_equals_one_search_per_run(synthetic):
    from metadistill.search import hyperopt_search

    config = dataclasses.replace(SYNTHETIC, epochs=30)
    singles = [hyperopt_search(synthetic, config, seed, trials=3) for seed in SEEDS]
    batched = hyperopt_search_batched(synthetic, config, SEEDS, trials=3)
    for single, batch in zip(singles, batched):
        assert [(t["lambda1"], t["temperature"], t["val_acc"]) for t in batch.extra["trials"]] == [
            (t["lambda1"], t["temperature"], t["val_acc"]) for t in single.extra["trials"]]
        assert (batch.final_test_acc, batch.steps, batch.full_trainings) == (
            single.final_test_acc, single.steps, single.full_trainings)


def test_a_diverging_run_stops_alone(float64):
    problem = image_problem()
    calls = []

    def make_student():
        model = fashion_student()
        calls.append(1)
        if len(calls) == 2:  # the second run of the batch starts from infinite weights
            with torch.no_grad():
                model[-1].bias.fill_(math.inf)
        return model

    poisoned = dataclasses.replace(problem, make_student=make_student)
    outcomes = fit_batched(poisoned, [strategy("gradient") for _ in SEEDS], IMAGE, SEEDS)
    assert isinstance(outcomes[1], DivergenceError) and "diverged at step 0" in str(outcomes[1])
    singles = [fit(problem, strategy("gradient"), IMAGE, seed) for seed in (0, 2)]
    assert_same_runs(singles, [outcomes[0], outcomes[2]])


def test_an_interrupted_batch_resumes_from_its_checkpoint(tmp_path, float64):
    problem = image_problem()
    config = dataclasses.replace(IMAGE, epochs=4)
    path = tmp_path / "train.ckpt"
    whole = fit_batched(problem, [strategy("proposed") for _ in SEEDS], config, SEEDS)

    class Stop(Exception):
        pass

    def stop_in_epoch_three(step, total):
        if step == 10:
            raise Stop

    with pytest.raises(Stop):
        fit_batched(problem, [strategy("proposed") for _ in SEEDS], config, SEEDS, stop_in_epoch_three, path,
                    identity="x", checkpoint_every_s=0.0)
    assert path.exists()
    assert torch.load(path, weights_only=True)["step"] == 8  # the end of epoch two; a weights-only file
    # another identity does not resume from it
    other = fit_batched(problem, [strategy("proposed") for _ in SEEDS], config, SEEDS, None, path, identity="y",
                        checkpoint_every_s=1e9)  # (it must not overwrite the checkpoint either)
    assert_same_runs(whole, other)
    resumed_steps = []
    resumed = fit_batched(problem, [strategy("proposed") for _ in SEEDS], config, SEEDS,
                          lambda step, total: resumed_steps.append(step), path, identity="x")
    assert resumed_steps[0] == 9
    assert_same_runs(whole, resumed)


def test_an_interrupted_hyperopt_search_counts_the_time_before_the_interruption(synthetic, tmp_path):
    config = dataclasses.replace(SYNTHETIC, epochs=10)  # full batch: every step ends an epoch
    whole = hyperopt_search_batched(synthetic, config, SEEDS, trials=3)

    class Stop(Exception):
        pass

    def slow_then_stop(step, total):  # global steps: trial 1 is steps 11-20
        if step == 13:
            time.sleep(0.5)  # before the checkpoint of step 14, which keeps it
        if step == 16:
            raise Stop

    with pytest.raises(Stop):
        hyperopt_search_batched(synthetic, config, SEEDS, 3, slow_then_stop, tmp_path, "x", checkpoint_every_s=0.0)
    assert len(json.loads((tmp_path / "search.json").read_text())["histories"][0]) == 1
    assert torch.load(tmp_path / "trial_1.ckpt", weights_only=False)["step"] == 6
    resumed = hyperopt_search_batched(synthetic, config, SEEDS, 3, None, tmp_path, "x")
    for a, b in zip(whole, resumed):
        assert b.extra["trials"] == [dict(t, wall_s=u["wall_s"]) for t, u in zip(a.extra["trials"], b.extra["trials"])]
        assert b.final_test_acc == a.final_test_acc
    assert resumed[0].extra["batch_wall_s"] >= 0.5
    assert resumed[0].wall_s == pytest.approx(resumed[0].extra["batch_wall_s"] / len(SEEDS))
