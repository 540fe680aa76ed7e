"""The three hypergradient methods against a float64 double-backward oracle written independently."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metadistill import Metaparameters, greedy_hypergradient
from metadistill.hypergrad import greedy
from metadistill.jvp import record_activations
from metadistill.steps import Runs, take_step, validation_gradient

pytestmark = pytest.mark.usefixtures("float64")


class Functional(nn.Module):
    """A student whose forward uses functional ops between modules (not a chain: generic JVP)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3)

    def forward(self, x):
        return self.b(F.softplus(self.a(x)) + 0.5 * x.sum(1, keepdim=True))


def mlp():
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(24, 8), nn.BatchNorm1d(8), nn.Sigmoid(), nn.Linear(8, 3),
    )


def make(kind, seed=0):
    torch.manual_seed(seed)
    model = {"mlp": mlp, "cnn": cnn, "functional": Functional}[kind]()
    shape = (2, 14, 14) if kind == "cnn" else (5,)
    x, xv = torch.randn(12, *shape), torch.randn(10, *shape)
    y, yv = torch.randint(0, 3, (12,)), torch.randint(0, 3, (10,))
    teacher = 2.0 * torch.randn(12, 3)
    model.train()
    return model, x, y, teacher, xv, yv


def oracle(model, x, y, teacher, xv, yv, lam, lr, t_val, t2_scaling=False):
    """d L_val(w - lr grad L_train(w, lambda)) / d lambda by plain double backward, paper's CE form."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    def buffers():
        return {n: b.detach().clone() for n, b in model.named_buffers()}
    lam_t = torch.tensor(lam.as_tuple(), requires_grad=True)
    lambda1, temperature = lam_t[0], lam_t[1]
    z = functional_call(model, (params, buffers()), (x,))
    hard = -F.log_softmax(z, 1).gather(1, y[:, None]).mean()
    soft_teacher = F.softmax(teacher / temperature, 1)
    soft = -(soft_teacher * F.log_softmax(z / temperature, 1)).sum(1).mean()
    scale = temperature**2 if t2_scaling else 1.0
    loss = lambda1 * hard + (1 - lambda1) * scale * soft
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    moved = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    zv = functional_call(model, (moved, buffers()), (xv,))
    val = F.cross_entropy(zv / t_val, yv)
    return torch.autograd.grad(val, lam_t)[0]


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CASES = [
    ("mlp", Metaparameters(0.3, 2.5), 0.5, 1.0, False),
    ("mlp", Metaparameters(0.8, 0.4), 0.2, 0.1, True),
    ("cnn", Metaparameters(0.5, 1.7), 0.3, 1.0, False),
    ("cnn", Metaparameters(0.1, 4.0), 1.0, 1.0, True),
    ("functional", Metaparameters(0.6, 3.0), 0.4, 1.0, False),
]


@pytest.mark.parametrize("kind,lam,lr,t_val,t2", CASES)
@pytest.mark.parametrize("method,rtol", [("jvp", 1e-6), ("double", 1e-6), ("fd", 1e-3)])
def test_methods_match_double_backward_oracle(kind, lam, lr, t_val, t2, method, rtol):
    model, x, y, teacher, xv, yv = make(kind)
    expected = oracle(model, x, y, teacher, xv, yv, lam, lr, t_val, t2)
    before = state_of(model)
    got = greedy_hypergradient(model, x, y, teacher, xv, yv, lam, lr, t_val=t_val, method=method,
                               t2_scaling=t2)
    after = state_of(model)
    assert got.shape == (2,)
    assert float(expected.abs().min()) > 1e-6  # the comparison is not between two zeros
    torch.testing.assert_close(got, expected, rtol=rtol, atol=1e-12)
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed"


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_tape_jvp_equals_forward_mode_autograd(kind, tape_and_forward_mode):
    model, x, *_ = make(kind)
    logits, tape, primal, expected = tape_and_forward_mode(model, x)
    torch.testing.assert_close(logits.detach(), primal)
    torch.testing.assert_close(tape, expected, rtol=1e-9, atol=1e-12)


def test_functional_model_is_not_taken_for_a_chain():
    model, x, *_ = make("functional")
    with record_activations(model) as record:
        logits = model(x)
    assert not record.chain(x, logits)


def test_eval_mode_batchnorm_uses_running_statistics():
    model, x, y, teacher, xv, yv = make("cnn")
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn_like(x))  # move the running statistics away from (0, 1)
    model.eval()
    lam = Metaparameters(0.4, 2.0)
    expected = oracle(model, x, y, teacher, xv, yv, lam, 0.5, 1.0)
    got = greedy_hypergradient(model, x, y, teacher, xv, yv, lam, 0.5, method="jvp")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)


def distill(z, lam_t, y, teacher):
    """The train loss written out (the paper's form) with lambda as a tensor."""
    return lam_t[0] * F.cross_entropy(z, y) + (1 - lam_t[0]) * F.kl_div(
        F.log_softmax(z / lam_t[1], 1), F.log_softmax(teacher / lam_t[1], 1), reduction="batchmean", log_target=True)


@pytest.mark.parametrize("opt_name", ["sgd", "sgd_nesterov", "adam", "adam_fixed", "adamw_amsgrad"])
def test_loop_ordering_matches_oracle_through_optimizer(opt_name):
    """A real optimizer step, then its hypergradient, against the optimizer's update written out by hand and
    differentiated by autograd: d L_val(w'(lambda)) / d lambda with everything before the step held fixed.

    SGD with momentum, dampening or Nesterov and weight decay is exact; Adam and AdamW (amsgrad too) are
    exact with adam_update="exact" (the default): the second moment's dependence on the gradient is
    differentiated. "fixed_second_moment" holds Adam's denominator fixed, and the oracle does too.
    """
    model, x, y, teacher, xv, yv = make("cnn", seed=1)
    lam = Metaparameters(0.35, 2.2)
    lr, momentum, decay, dampening = 0.2, 0.9, 1e-3, 0.1
    if opt_name.startswith("adam"):
        kind = torch.optim.AdamW if opt_name == "adamw_amsgrad" else torch.optim.Adam
        opt = kind(model.parameters(), lr=0.01, weight_decay=decay, amsgrad=opt_name == "adamw_amsgrad")
    else:
        nesterov = opt_name == "sgd_nesterov"
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, dampening=0.0 if nesterov else dampening,
                              weight_decay=decay, nesterov=nesterov)
    for _ in range(2):  # give the optimizer state (momentum buffers, moments)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    before = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
              for n, p in model.named_parameters()}

    adam_update = "fixed_second_moment" if opt_name == "adam_fixed" else "exact"
    _, taken = take_step(model, opt, Runs(), x, y, teacher, [lam], keep=True, adam_update=adam_update)
    v, _ = validation_gradient(model, Runs(), xv, yv)
    got = greedy(taken, v)[0]

    lam_t = torch.tensor(lam.as_tuple(), requires_grad=True)
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    z = functional_call(model, (leaves, {n: b.clone() for n, b in buffers.items()}), (x,))
    grads = dict(zip(names, torch.autograd.grad(distill(z, lam_t, y, teacher), list(leaves.values()),
                                                create_graph=True)))
    group = opt.param_groups[0]
    moved = {}
    for n in names:
        w, g, state = params[n], grads[n], before[n]
        if opt_name.startswith("sgd"):
            d_p = g + decay * w
            buf = momentum * state["momentum_buffer"] + (1 - group["dampening"]) * d_p
            moved[n] = w - lr * (d_p + momentum * buf if group["nesterov"] else buf)
            continue
        (beta1, beta2), t, eps = group["betas"], float(state["step"]) + 1, group["eps"]
        g = g if opt_name == "adamw_amsgrad" else g + decay * w
        m = beta1 * state["exp_avg"] + (1 - beta1) * g
        second = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
        if opt_name == "adam_fixed":
            second = opt.state[dict(model.named_parameters())[n]]["exp_avg_sq"]  # held at its value after the step
        if opt_name == "adamw_amsgrad":
            second = torch.maximum(state["max_exp_avg_sq"], second)
        step = 0.01 * (m / (1 - beta1**t)) / ((second / (1 - beta2**t)).sqrt() + eps)
        moved[n] = (w * (1 - 0.01 * decay) if opt_name == "adamw_amsgrad" else w) - step
    zv = functional_call(model, (moved, {n: b.clone() for n, b in buffers.items()}), (xv,))
    expected = torch.autograd.grad(F.cross_entropy(zv, yv), lam_t)[0]
    assert float(expected.abs().min()) > 1e-8
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
