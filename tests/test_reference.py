"""The engine against the simplest possible training loop, written here as the oracle (float64, to rounding).

The reference loop does everything the plain way: per-sample-index batches from the same seeded
permutations, the paper's loss written out, loss.backward() and optimizer.step(), and each greedy
hypergradient by double backward through the optimizer's update written out by hand (everything before
the step held fixed). No tape, no stacking, no update maps, no run axis.
"""

import contextlib
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metadistill.engine import fit, fit_batched
from metadistill.meta import Metaparameters
from metadistill.problem import Problem
from metadistill.strategies import Fixed, Gradient, LinearTrajectory, MetaOptimizer
from metadistill.train import TrainConfig

pytestmark = pytest.mark.usefixtures("float64")


def student():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(27, 8), nn.Tanh(), nn.Linear(8, 4))


class Attention(nn.Module):
    """A student with a Transformer encoder layer (attention dropout and dropout active in train mode)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.flatten(1, 2))).mean(1))


STUDENTS = {
    "cnn": student,
    "dropout": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4)),
    "attention": Attention,
}


def problem(kind="cnn"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (80,), generator=g)
    return Problem(x[:40], y[:40], 2 * torch.randn(40, 4, generator=g), x[40:60], y[40:60], x[60:], y[60:],
                   STUDENTS[kind])


@contextlib.contextmanager
def math_attention():
    """Attention by the math kernel, no fused fast path: the kernel whose dropout masks the oracle replays."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def loss_of(z, y, teacher, lam):
    """The paper's train loss, lambda a tensor [lambda1, T]."""
    soft = (F.softmax(teacher / lam[1], 1) * (F.log_softmax(teacher / lam[1], 1) - F.log_softmax(z / lam[1], 1)))
    return lam[0] * F.cross_entropy(z, y) + (1 - lam[0]) * soft.sum(1).mean()


def stepped(config, w, g, state, group):
    """w' of torch.optim.SGD / Adam with their state before the step (differentiable in g)."""
    if config.optimizer == "sgd":
        d = g + config.weight_decay * w
        if config.momentum:
            d = d if state.get("momentum_buffer") is None else config.momentum * state["momentum_buffer"] + d
        return w - group["lr"] * d
    (beta1, beta2), t = group["betas"], float(state.get("step", 0)) + 1
    g = g + config.weight_decay * w
    m = beta1 * state.get("exp_avg", torch.zeros_like(w)) + (1 - beta1) * g
    v = beta2 * state.get("exp_avg_sq", torch.zeros_like(w)) + (1 - beta2) * g * g
    return w - group["lr"] * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])


def oracle_hypergradient(data, config, model, group, lam, params, buffers, state, x, y, teacher, val_batches,
                         val_gen, seen, rng):
    """d L_val(w'(lambda)) / d lambda by double backward through the step written out (state before it fixed;
    the step's forward replayed from its RNG state `rng`, so with its own dropout masks)."""
    if not val_batches:
        val_batches.extend(torch.randperm(len(data.x_val), generator=val_gen).split(config.batch_size))
    v_index = val_batches.pop(0)
    lam_t = torch.tensor(lam.as_tuple(), requires_grad=True)
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    with torch.random.fork_rng(devices=[]), math_attention():
        torch.set_rng_state(rng)
        z = functional_call(model, (leaves, {n: b.clone() for n, b in buffers.items()}), (x,))
    grads = torch.autograd.grad(loss_of(z, y, teacher, lam_t), list(leaves.values()), create_graph=True)
    moved = {n: stepped(config, params[n], g, state[n], group) for n, g in zip(params, grads)}
    zv = functional_call(model, (moved, {n: b.clone() for n, b in buffers.items()}), (data.x_val[v_index],))
    h = torch.autograd.grad(F.cross_entropy(zv / config.t_val, data.y_val[v_index]), lam_t)[0]
    seen.append(h.tolist())
    return h


def reference_fit(data, strategy, config, seed):
    """(lambda1 per step, T per step, train losses, hypergradients, final test accuracy)."""
    torch.manual_seed(seed)
    model = data.make_student()
    model.train()
    opt = (torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
           if config.optimizer == "adam" else
           torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay))
    train_gen, val_gen = torch.Generator().manual_seed(2 * seed), torch.Generator().manual_seed(2 * seed + 1)
    val_batches = []
    lam = strategy.start(seed)
    out = {"lambda1": [], "temperature": [], "train_loss": [], "h": []}
    step = -1
    for epoch in range(config.epochs):
        for group in opt.param_groups:
            group["lr"] = config.lr * config.lr_decay_factor ** (epoch // config.lr_decay_every)
        batches = torch.randperm(len(data.x_train), generator=train_gen).split(config.batch_size)
        for index in batches:
            step += 1
            out["lambda1"].append(lam.lambda1)
            out["temperature"].append(lam.temperature)
            x, y, teacher = data.x_train[index], data.y_train[index], data.teacher_train[index]
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
            buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
            state = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                     for n, p in model.named_parameters()}
            rng = torch.get_rng_state()
            with math_attention():
                loss = loss_of(model(x), y, teacher, torch.tensor(lam.as_tuple()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            out["train_loss"].append(float(loss.detach()))

            asked = functools.partial(oracle_hypergradient, data, config, model, opt.param_groups[0], lam, params,
                                      buffers, state, x, y, teacher, val_batches, val_gen, out["h"], rng)
            lam = strategy.advance(step, asked)
    model.eval()
    with torch.no_grad():
        out["test_acc"] = float((model(data.x_test).argmax(1) == data.y_test).double().mean())
    return out


CONFIGS = {
    "sgd": TrainConfig(epochs=3, batch_size=8, lr=0.3, momentum=0.9, weight_decay=1e-3, lr_decay_every=1,
                       lr_decay_factor=0.5, t_val=0.7),
    "adam": TrainConfig(epochs=2, batch_size=8, lr=0.01, optimizer="adam", weight_decay=1e-3, lr_decay_every=1),
}
STRATEGIES = {
    "naive": lambda: Fixed(Metaparameters(0.5, 1.0), "naive"),
    "gradient": lambda: Gradient(MetaOptimizer("sgd", 0.5, 0.0), lambda1=0.6, temperature=2.0),
    "gradient_adam_meta": lambda: Gradient(MetaOptimizer("adam", 0.05), lambda1=0.3, temperature=3.0),
    "proposed": lambda: LinearTrajectory(3, 2, MetaOptimizer("sgd", 0.5, 0.0), lambda1=0.6, temperature=2.0),
}


class Recording:
    """Wraps a strategy so that the hypergradients it is given are kept."""

    def __init__(self, strategy):
        self.inner, self.seen = strategy, []
        self.name, self.horizon = strategy.name, getattr(strategy, "horizon", None)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def advance(self, step, hypergradient):
        def recorded():
            h = hypergradient()
            self.seen.append(h.tolist())
            return h

        return self.inner.advance(step, recorded)


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_engine_is_the_reference_loop(config_name, name):
    config, data = CONFIGS[config_name], problem()
    expected = reference_fit(data, STRATEGIES[name](), config, seed=4)
    strategy = Recording(STRATEGIES[name]())
    result = fit(data, strategy, config, seed=4)
    for key in ("lambda1", "temperature", "train_loss"):
        np.testing.assert_allclose(result.history[key], expected[key], rtol=1e-9, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(np.array(strategy.seen).reshape(-1, 2), np.array(expected["h"]).reshape(-1, 2),
                               rtol=1e-8, atol=1e-12)
    assert result.final_test_acc == expected["test_acc"]
    if name != "naive":
        assert len(expected["h"]) > 3 and len(set(result.history["lambda1"])) > 3
    # and R stacked runs are the same computation, run by run
    strategies = [Recording(STRATEGIES[name]()) for _ in range(2)]
    batched = fit_batched(data, strategies, config, [4, 5])
    np.testing.assert_allclose(batched[0].history["lambda1"], expected["lambda1"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.array(strategies[0].seen).reshape(-1, 2), np.array(expected["h"]).reshape(-1, 2),
                               rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", ["dropout", "attention"])
def test_active_dropout_and_attention_students_get_the_hypergradient_of_the_step_taken(kind):
    """Train mode with dropout (and attention dropout): each hypergradient is the derivative of the step the
    engine took, with that step's own masks (the generic JVP replays its RNG state)."""
    config, data = CONFIGS["sgd"], problem(kind)
    expected = reference_fit(data, STRATEGIES["gradient"](), config, seed=2)
    strategy = Recording(STRATEGIES["gradient"]())
    result = fit(data, strategy, config, seed=2)
    np.testing.assert_allclose(result.history["train_loss"], expected["train_loss"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.array(strategy.seen).reshape(-1, 2), np.array(expected["h"]).reshape(-1, 2),
                               rtol=1e-7, atol=1e-12)
    assert len(set(result.history["lambda1"])) > 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (bench/gpu_check.sh runs this on one)")
@pytest.mark.parametrize("name", ["naive", "gradient", "proposed"])
def test_cuda_runs_equal_cpu_runs(name):
    import dataclasses

    config = CONFIGS["sgd"]
    cpu = fit(problem(), STRATEGIES[name](), config, seed=4)
    cuda = fit(problem(), STRATEGIES[name](), dataclasses.replace(config, device="cuda"), seed=4)
    for key in ("lambda1", "temperature", "train_loss"):
        np.testing.assert_allclose(cuda.history[key], cpu.history[key], rtol=1e-7, atol=1e-10, err_msg=key)
    batched = fit_batched(problem(), [STRATEGIES[name]() for _ in range(2)], dataclasses.replace(config, device="cuda"),
                          [4, 5])
    np.testing.assert_allclose(batched[0].history["lambda1"], cpu.history["lambda1"], rtol=1e-7, atol=1e-10)
