"""The long-horizon hypergradients: unrolled against double backward through the unrolled steps, and the
online strategy against the greedy method (gamma = 0) and the unrolled derivative (gamma = 1, lambda fixed)."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metadistill import Gradient, Metaparameters, Online, greedy_hypergradient, unrolled_hypergradient
from metadistill.engine import fit, fit_batched
from metadistill.problem import Problem
from metadistill.strategies import Horizon, MetaOptimizer
from metadistill.train import TrainConfig

pytestmark = pytest.mark.usefixtures("float64")


def mlp():
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(36, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def batches(kind, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 8, 8) if kind == "cnn" else (5,)
    xs = [torch.randn(10, *shape, generator=g) for _ in range(k)]
    ys = [torch.randint(0, 3, (10,), generator=g) for _ in range(k)]
    teachers = [2.0 * torch.randn(10, 3, generator=g) for _ in range(k)]
    return xs, ys, teachers, torch.randn(12, *shape, generator=g), torch.randint(0, 3, (12,), generator=g)


def unrolled_oracle(model, xs, ys, teachers, x_val, y_val, lam, lr, momentum, decay, t_val):
    """d L_val(w_K) / d lambda by double backward through K SGD steps written out (torch.optim.SGD's rule)."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    lam_t = torch.tensor(lam.as_tuple(), requires_grad=True)
    w, buf = dict(params), None
    for x, y, teacher in zip(xs, ys, teachers):
        z = functional_call(model, (w, buffers), (x,))
        loss = lam_t[0] * F.cross_entropy(z, y) + (1 - lam_t[0]) * F.kl_div(
            F.log_softmax(z / lam_t[1], 1), F.log_softmax(teacher / lam_t[1], 1), reduction="batchmean",
            log_target=True)
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        d = {n: g + decay * w[n] for n, g in zip(w, grads)}
        buf = d if buf is None or momentum == 0 else {n: momentum * buf[n] + d[n] for n in d}
        w = {n: w[n] - lr * buf[n] for n in w}
    val = F.cross_entropy(functional_call(model, (w, buffers), (x_val,)) / t_val, y_val)
    return torch.autograd.grad(val, lam_t)[0]


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("momentum,decay", [(0.0, 0.0), (0.9, 1e-2)])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_unrolled_equals_double_backward_through_the_steps(kind, momentum, decay, k):
    torch.manual_seed(1)
    model = {"mlp": mlp, "cnn": cnn}[kind]()
    model.train()
    xs, ys, teachers, x_val, y_val = batches(kind, k)
    lam, lr = Metaparameters(0.4, 2.5), 0.3
    expected = unrolled_oracle(model, xs, ys, teachers, x_val, y_val, lam, lr, momentum, decay, 1.0)
    before = state_of(model)
    got = unrolled_hypergradient(model, xs, ys, teachers, x_val, y_val, lam, lr, momentum=momentum,
                                 weight_decay=decay)
    assert not got.requires_grad and float(expected.abs().min()) > 1e-6
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)
    after = state_of(model)
    assert all(torch.equal(before[key], after[key]) for key in before)
    if k == 1 and momentum == 0:
        greedy = greedy_hypergradient(model, xs[0], ys[0], teachers[0], x_val, y_val, lam, lr)
        torch.testing.assert_close(got, greedy, rtol=1e-10, atol=1e-14)


def test_identity_drops_the_curvature_and_equals_exact_after_one_step():
    torch.manual_seed(2)
    model = mlp()
    xs, ys, teachers, x_val, y_val = batches("mlp", 4)
    lam = Metaparameters(0.3, 1.5)
    one = [unrolled_hypergradient(model, xs[:1], ys[:1], teachers[:1], x_val, y_val, lam, 0.5, hessian=h)
           for h in ("exact", "identity")]
    torch.testing.assert_close(one[0], one[1], rtol=1e-12, atol=1e-14)
    four = [unrolled_hypergradient(model, xs, ys, teachers, x_val, y_val, lam, 0.5, hessian=h)
            for h in ("exact", "identity")]
    assert not torch.allclose(four[0], four[1], rtol=1e-3)


def problem(make_student=mlp) -> Problem:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 1).long()
    teacher = 3.0 * F.one_hot(y, 3).double() + torch.randn(96, 3, generator=g)
    return Problem(x[:48], y[:48], teacher[:48], x[48:72], y[48:72], x[72:], y[72:], make_student)


CONFIG = TrainConfig(epochs=3, batch_size=12, lr=0.5, momentum=0.5, weight_decay=1e-3, eval_every=4)


def test_online_with_gamma_zero_is_the_gradient_method_to_the_bit():
    meta = dict(lambda1=0.5, temperature=2.0)
    greedy_run = fit(problem(), Gradient(MetaOptimizer("sgd", 0.1, 0.0), **meta), CONFIG, seed=3)
    online_run = fit(problem(), Online(MetaOptimizer("sgd", 0.1, 0.0), horizon=Horizon(0.0), **meta), CONFIG, seed=3)
    assert online_run.history == greedy_run.history
    assert online_run.evals == greedy_run.evals
    assert len(set(online_run.history["lambda1"])) > 3


class Watching(Online):
    """The online method that records its hypergradients and keeps lambda where it started (test only)."""

    def __init__(self, **kwargs):
        super().__init__(lambda1=0.4, temperature=2.5, **kwargs)
        self.seen = []

    def advance(self, step, hypergradient):
        self.seen.append(hypergradient().clone())
        return self.lam


@pytest.mark.parametrize("hessian", ["exact", "identity"])
def test_online_with_gamma_one_and_fixed_lambda_is_the_unrolled_derivative(hessian):
    config = dataclasses.replace(CONFIG, epochs=1, momentum=0.0, weight_decay=0.0)
    data = problem()
    strategy = Watching(horizon=Horizon(1.0, hessian))
    fit(data, strategy, config, seed=5)
    # the same K batches fit drew: the run's train and validation streams (seeded 2 seed, 2 seed + 1)
    from metadistill.problem import batch_streams

    train, val = batch_streams(data, config.batch_size, 0, 5, torch.device("cpu"))
    indices = [next(train) for _ in range(4)]
    val_indices = [next(val) for _ in range(4)]
    torch.manual_seed(5)
    model = data.make_student()
    for k in (1, 2, 4):
        expected = unrolled_hypergradient(
            model, [data.x_train[i] for i in indices[:k]], [data.y_train[i] for i in indices[:k]],
            [data.teacher_train[i] for i in indices[:k]], data.x_val[val_indices[k - 1]],
            data.y_val[val_indices[k - 1]], Metaparameters(0.4, 2.5), config.lr, hessian=hessian)
        torch.testing.assert_close(strategy.seen[k - 1], expected, rtol=1e-8, atol=1e-12)


def test_online_batched_equals_one_at_a_time():
    from test_batched import assert_same_runs

    def cnn_problem():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 2, 8, 8, generator=g)
        y = torch.randint(0, 3, (64,), generator=g)
        return Problem(x[:32], y[:32], 2 * torch.randn(32, 3, generator=g), x[32:48], y[32:48], x[48:], y[48:],
                       lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                             nn.Flatten(), nn.Linear(36, 3)))

    config = TrainConfig(epochs=2, batch_size=8, lr=0.2, momentum=0.5, eval_every=3)
    data = cnn_problem()
    make = lambda: Online(MetaOptimizer("sgd", 0.1, 0.0), horizon=Horizon(0.9, "exact"))  # noqa: E731
    singles = [fit(data, make(), config, seed) for seed in (0, 1, 2)]
    batched = fit_batched(data, [make() for _ in range(3)], config, [0, 1, 2])
    assert_same_runs(singles, batched)
    assert len(set(batched[0].history["lambda1"])) > 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (bench/gpu_check.sh runs this on one)")
@pytest.mark.parametrize("hessian", ["exact", "identity"])
def test_online_cuda_equals_cpu(hessian):
    make = lambda: Online(MetaOptimizer("sgd", 0.1, 0.0), lambda1=0.5, temperature=2.0,  # noqa: E731
                          horizon=Horizon(0.9, hessian))
    cpu = fit(problem(), make(), CONFIG, seed=1)
    cuda = fit(problem(), make(), dataclasses.replace(CONFIG, device="cuda"), seed=1)
    for key in ("lambda1", "temperature", "train_loss"):
        np.testing.assert_allclose(cuda.history[key], cpu.history[key], rtol=1e-7, atol=1e-10, err_msg=key)


@pytest.mark.parametrize("decay", [0.0, 1e-2])
def test_online_through_adam_is_the_derivative_of_the_unrolled_adam_steps(decay):
    """With Adam, Z carries the tangents of both moments: gamma = 1 with lambda held fixed is the exact derivative
    of L_val after K Adam steps (double backward through the steps written out, moments included)."""
    config = dataclasses.replace(CONFIG, epochs=1, optimizer="adam", lr=0.05, momentum=0.0, weight_decay=decay)
    data = problem()
    strategy = Watching(horizon=Horizon(1.0, "exact"))
    fit(data, strategy, config, seed=2)
    from metadistill.problem import batch_streams

    train, val = batch_streams(data, config.batch_size, 0, 2, torch.device("cpu"))
    indices, val_indices = [next(train) for _ in range(3)], [next(val) for _ in range(3)]
    torch.manual_seed(2)
    model = data.make_student()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    lam_t = torch.tensor([0.4, 2.5], requires_grad=True)
    w = dict(params)
    m = {n: torch.zeros_like(p) for n, p in w.items()}
    v = {n: torch.zeros_like(p) for n, p in w.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for k, index in enumerate(indices, start=1):
        z = functional_call(model, (w, {}), (data.x_train[index],))
        teacher = data.teacher_train[index]
        loss = lam_t[0] * F.cross_entropy(z, data.y_train[index]) + (1 - lam_t[0]) * F.kl_div(
            F.log_softmax(z / lam_t[1], 1), F.log_softmax(teacher / lam_t[1], 1), reduction="batchmean",
            log_target=True)
        grads = dict(zip(w, torch.autograd.grad(loss, list(w.values()), create_graph=True)))
        g = {n: grads[n] + config.weight_decay * w[n] for n in w}
        m = {n: beta1 * m[n] + (1 - beta1) * g[n] for n in w}
        v = {n: beta2 * v[n] + (1 - beta2) * g[n] * g[n] for n in w}
        w = {n: w[n] - config.lr * (m[n] / (1 - beta1**k)) / ((v[n] / (1 - beta2**k)).sqrt() + eps) for n in w}
        zv = functional_call(model, (w, {}), (data.x_val[val_indices[k - 1]],))
        expected = torch.autograd.grad(F.cross_entropy(zv, data.y_val[val_indices[k - 1]]), lam_t,
                                       retain_graph=True)[0]
        torch.testing.assert_close(strategy.seen[k - 1], expected, rtol=1e-7, atol=1e-12)


def test_a_run_whose_tangents_stop_being_finite_restarts_them_and_only_that_run():
    """OnlineTangent: a run of a batch whose Z or momentum tangent overflowed starts both again from 0 (counted);
    the other run's tangents are kept bit for bit, and finite tangents are never touched."""
    from metadistill.hypergrad import OnlineTangent
    from metadistill.steps import Runs

    tracker = OnlineTangent(gamma=0.99)
    g = torch.Generator().manual_seed(0)
    # two runs side by side: [2 (d lambda1, d T), 2 runs * 3 rows, 4] for a weight, [2, 2 runs * 3] for a bias
    z = {"w": torch.randn(2, 6, 4, generator=g), "b": torch.randn(2, 6, generator=g)}
    state = {"w": {"buffer": torch.randn(2, 6, 4, generator=g)}}
    tracker.z, tracker.state = {k: v.clone() for k, v in z.items()}, {"w": {"buffer": state["w"]["buffer"].clone()}}
    tracker._restart_nonfinite(Runs(count=2, stacked=True))
    assert tracker.restarts == [0, 0]
    assert all(torch.equal(tracker.z[k], z[k]) for k in z)
    tracker.state["w"]["buffer"][1, 4, 2] = float("inf")  # run 1's momentum tangent overflowed
    tracker.z["b"][0, 5] = float("nan")
    tracker._restart_nonfinite(Runs(count=2, stacked=True))
    assert tracker.restarts == [0, 1]
    assert torch.equal(tracker.z["w"][:, :3], z["w"][:, :3]) and torch.equal(tracker.z["b"][:, :3], z["b"][:, :3])
    assert torch.equal(tracker.state["w"]["buffer"][:, :3], state["w"]["buffer"][:, :3])
    assert not tracker.z["w"][:, 3:].any() and not tracker.z["b"][:, 3:].any()
    assert not tracker.state["w"]["buffer"][:, 3:].any()
    assert tracker.state_dict()["restarts"] == [0, 1]
