"""One contract run against every strategy, plus the specifics of each."""

import copy
import math

import numpy as np
import pytest
import torch

from metadistill import Metaparameters
from metadistill.meta import LAMBDA1_BOUNDS, TEMPERATURE_BOUNDS
from metadistill.strategies import Fixed, Gradient, LinearTrajectory, MetaOptimizer, Random, random_metaparameters

FACTORIES = {
    "no_distillation": lambda: Fixed(Metaparameters(1.0, 1.0), "no_distillation"),
    "naive": lambda: Fixed(Metaparameters(0.5, 1.0), "naive"),
    "random": Random,
    "gradient": Gradient,
    "gradient_adam": lambda: Gradient(MetaOptimizer("adam", 0.3)),
    "proposed": lambda: LinearTrajectory(window=4, period=3),
    "proposed_adam": lambda: LinearTrajectory(window=3, period=2, meta=MetaOptimizer("adam", 0.3, 0.0)),
}
FIXED = {"no_distillation", "naive", "random"}


def hypergradients(seed):
    """Large, signed, sometimes non-finite hypergradients: bounds and NaN handling get exercised."""
    rng = np.random.default_rng(seed)
    for step in range(10**6):
        h = rng.normal(size=2) * 10.0 ** rng.integers(-4, 3)
        if step % 17 == 5:
            h[step % 2] = [math.nan, math.inf, -math.inf][step % 3]
        yield torch.tensor(h)


def drive(strategy, steps, seed=0, start=True, source=None):
    """Run the loop's protocol; returns the lambdas used and the steps that requested a hypergradient."""
    source = source or hypergradients(seed)
    lams = [strategy.start(seed)] if start else [strategy.lam]
    asked = []
    for step in range(steps):
        wants = strategy.wants_hypergradient(step)

        def hypergradient(step=step, wants=wants):
            assert wants, f"asked at step {step} without announcing it"
            asked.append(step)
            return next(source)

        lams.append(strategy.advance(step, hypergradient))
    return lams, asked


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_contract(name):
    lams, asked = drive(FACTORIES[name](), 120, seed=3)
    for lam in lams:
        assert LAMBDA1_BOUNDS[0] <= lam.lambda1 <= LAMBDA1_BOUNDS[1]
        assert TEMPERATURE_BOUNDS[0] <= lam.temperature <= TEMPERATURE_BOUNDS[1]
    again, asked_again = drive(FACTORIES[name](), 120, seed=3)
    assert again == lams and asked_again == asked
    if name in FIXED:
        assert asked == [] and len(set(lams)) == 1
    else:
        assert len(set(lams)) > 1


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trip(name):
    source = hypergradients(5)
    first = FACTORIES[name]()
    drive(first, 37, seed=5, source=source)
    saved = copy.deepcopy(first.state_dict())
    rest = list(next(source) for _ in range(200))
    second = FACTORIES[name]()
    second.load_state_dict(saved)

    def cont(strategy):
        lams = []
        it = iter(rest)
        for step in range(37, 90):
            lams.append(strategy.advance(step, lambda: next(it)))
        return lams

    assert cont(first) == cont(second)


@pytest.mark.parametrize("window,period", [(4, 3), (10, 2), (5, 1), (3, 10)])
def test_proposed_requests_exactly_in_gradient_windows(window, period):
    _, asked = drive(LinearTrajectory(window, period), 200)
    assert asked == [t for t in range(200) if (t // window) % period == 0]


def test_proposed_predictions_continue_the_fitted_line():
    """A constant hypergradient moves lambda linearly, so the predictions must extend that line exactly."""
    window, period = 5, 3
    strategy = LinearTrajectory(window, period, MetaOptimizer("sgd", 1.0, 0.01), lambda1=0.5, temperature=5.0)
    lams, _ = drive(strategy, 2 * window * period, source=iter([torch.tensor([0.004, -0.01])] * 1000))
    # lams[t] is lambda used at step t; during the gradient window lambda moves by (-0.004, +0.01) per step.
    for t in range(1, window):
        assert lams[t].lambda1 == pytest.approx(0.5 - 0.004 * t)
        assert lams[t].temperature == pytest.approx(5.0 + 0.01 * t)
    # The value recorded after the update at z = 0..m-1 is lams[z + 1]; the line through them is
    # evaluated at z = m..P*m-1 for the prediction steps (the paper's indexing: one step ahead).
    for z in range(window, window * period):
        step = z  # first cycle: step index equals its position in the cycle
        assert lams[step].lambda1 == pytest.approx(0.5 - 0.004 * (z + 1))
        assert lams[step].temperature == pytest.approx(5.0 + 0.01 * (z + 1))
    # the next gradient window starts from the last predicted value
    assert lams[window * period] == lams[window * period - 1]


def test_predictions_are_clamped():
    strategy = LinearTrajectory(3, 10, MetaOptimizer("sgd", 10.0, 0.01), lambda1=0.2, temperature=0.5)
    lams, _ = drive(strategy, 30, source=iter([torch.tensor([0.01, 0.01])] * 1000))
    assert min(lam.lambda1 for lam in lams) == 0.0
    assert min(lam.temperature for lam in lams) == TEMPERATURE_BOUNDS[0]


def test_sgd_meta_update_clips_each_component():
    meta = MetaOptimizer("sgd", 0.1, 0.01)
    lam = meta.update(Metaparameters(0.5, 2.0), torch.tensor([5.0, -0.004]))
    assert lam.lambda1 == pytest.approx(0.5 - 0.1 * 0.01)
    assert lam.temperature == pytest.approx(2.0 + 0.1 * 0.004)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_nan_hypergradient_leaves_lambda_in_place_and_in_bounds(kind):
    meta = MetaOptimizer(kind, 0.5, 0.01)
    start = Metaparameters(0.3, 0.2)
    meta.reset(start)
    lam = meta.update(start, torch.tensor([math.nan, -math.inf]))
    assert lam == start or (abs(lam.lambda1 - 0.3) < 1e-9 and abs(lam.temperature - 0.2) < 1e-9)


def test_random_draw_is_log_uniform_and_shared_with_gradient_init():
    draws = [random_metaparameters(seed) for seed in range(2000)]
    logs = np.log10([d.temperature for d in draws])
    assert logs.min() >= -1 and logs.max() <= 1
    assert abs(np.mean(logs)) < 0.05 and abs(np.mean(logs < 0) - 0.5) < 0.05
    assert abs(np.mean([d.lambda1 for d in draws]) - 0.5) < 0.03
    assert Gradient(lambda1=None, temperature=None).start(7) == random_metaparameters(7) == Random().start(7)
    half_drawn = Gradient(lambda1=0.25, temperature=None).start(7)
    assert half_drawn == Metaparameters(0.25, random_metaparameters(7).temperature)
    # through the API the starting point is documented and the same for every seed: lambda1 0.5, T 1
    assert Gradient().start(7) == LinearTrajectory().start(3) == Metaparameters(0.5, 1.0)


@pytest.mark.parametrize("bad", [dict(window=1), dict(period=0)])
def test_bad_schedule_is_refused(bad):
    with pytest.raises(ValueError):
        LinearTrajectory(**bad)


@pytest.mark.parametrize("bad", [(1.5, 1.0), (-0.1, 1.0), (0.5, 0.05), (0.5, 11.0), (math.nan, 1.0), ("a", 1.0)])
def test_metaparameters_refuse_out_of_range(bad):
    with pytest.raises(ValueError):
        Metaparameters(*bad)


def test_unconstrained_round_trip():
    lam = Metaparameters(0.3, 4.0)
    assert Metaparameters.from_unconstrained(*lam.to_unconstrained()).lambda1 == pytest.approx(0.3)
    assert Metaparameters.from_unconstrained(*lam.to_unconstrained()).temperature == pytest.approx(4.0)


@pytest.mark.parametrize("kind", ["line", "hold", "line_long", "quadratic", "damped"])
def test_predictors_extrapolate_what_they_say(kind):
    from metadistill.strategies import fit_predictor, predict

    window, period = 4, 3
    line = [[(0.5 + 0.01 * (z - k * window * period), 2.0 - 0.1 * (z - k * window * period)) for z in range(window)]
            for k in (2, 1, 0)]
    fitted = fit_predictor(kind, line, window, period)
    got = predict(kind, fitted, 7, window)
    if kind == "hold":
        assert got == pytest.approx((0.53, 1.7))
    elif kind == "damped":
        gain = sum(0.9**i for i in range(1, 5))
        assert got == pytest.approx((0.53 + 0.01 * gain, 1.7 - 0.1 * gain))
    else:
        assert got == pytest.approx((0.57, 1.3))


def test_the_paper_predictor_is_the_literal_line_and_others_change_only_predictions():
    paper, hold = LinearTrajectory(window=4, period=3), LinearTrajectory(window=4, period=3, predictor="hold")
    lams, asked = drive(paper, 48, seed=2)
    held, asked_held = drive(hold, 48, seed=2)
    assert asked == asked_held and lams[:4] == held[:4] and lams != held
    # hold keeps the last recorded value through the prediction windows
    assert len({lam for lam, step in zip(held[5:13], range(4, 12)) if (step // 4) % 3}) == 1


def test_adam_meta_update_leaves_a_bound():
    meta = MetaOptimizer("adam", 0.1)
    meta.reset(Metaparameters(0.5, 1.0))
    lam = Metaparameters(0.0, 1.0)  # at lambda1 = 0, d lambda1 / d logit would be 0: it could never come back
    for _ in range(150):
        lam = meta.update(lam, torch.tensor([-1.0, 0.0], dtype=torch.float64))
        assert lam.lambda1 > 0.0
    assert lam.lambda1 > 0.01


def test_proposed_with_adam_predicts_strictly_inside_the_bounds():
    strategy = LinearTrajectory(window=3, period=4, meta=MetaOptimizer("adam", 2.0))
    steep = iter([torch.tensor([50.0, 50.0], dtype=torch.float64)] * 1000)  # drives lambda1 and T down fast
    lams, _ = drive(strategy, 60, seed=1, source=steep)
    assert all(0.0 < lam.lambda1 < 1.0 for lam in lams)


def test_meta_average_uses_the_mean_of_the_last_hypergradients():
    meta = MetaOptimizer("sgd", 1.0, 0.0, average=2)
    lam = Metaparameters(0.5, 2.0)
    lam = meta.update(lam, torch.tensor([0.1, 0.0], dtype=torch.float64))
    assert lam.lambda1 == pytest.approx(0.4)
    lam = meta.update(lam, torch.tensor([0.3, 0.0], dtype=torch.float64))
    assert lam.lambda1 == pytest.approx(0.2)  # mean of 0.1 and 0.3
    copy_ = MetaOptimizer("sgd", 1.0, 0.0, average=2)
    copy_.load_state_dict(meta.state_dict())
    assert copy_.update(lam, torch.tensor([0.5, 0.0], dtype=torch.float64)) == meta.update(
        lam, torch.tensor([0.5, 0.0], dtype=torch.float64))
