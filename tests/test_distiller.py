"""MetaDistiller in a loop the user owns: the hypergradient of the step actually taken, through a gradient
scaler, gradient clipping, accumulation and an LR schedule (float64 oracle); out-of-order calls raise."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metadistill import Gradient, MetaDistiller, Metaparameters
from metadistill.distiller import OrderError
from metadistill.strategies import Fixed, LinearTrajectory, MetaOptimizer

pytestmark = pytest.mark.usefixtures("float64")


def student():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 4))


def batches(step, k):
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g),
             2 * torch.randn(6, 4, generator=g)) for _ in range(k)]


def validation(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 4, (5,), generator=g)


class Recording(Gradient):
    def __init__(self):
        super().__init__(MetaOptimizer("sgd", 0.5, 0.0), lambda1=0.4, temperature=2.0)
        self.seen = []

    def advance(self, step, hypergradient):
        def recorded():
            h = hypergradient()
            self.seen.append(h.clone())
            return h

        return super().advance(step, recorded)


def oracle(model, params, buffers, buf, micro, lam, lr, momentum, decay, max_norm, x_val, y_val):
    """d L_val(w') / d lambda for the step written out: accumulated gradient, clipped, SGD with momentum."""
    lam_t = torch.tensor(lam.as_tuple(), requires_grad=True)
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    total = None
    for x, y, teacher in micro:
        z = functional_call(model, (leaves, {n: b.clone() for n, b in buffers.items()}), (x,))
        soft = F.kl_div(F.log_softmax(z / lam_t[1], 1), F.log_softmax(teacher / lam_t[1], 1), reduction="batchmean",
                        log_target=True)
        loss = (lam_t[0] * F.cross_entropy(z, y) + (1 - lam_t[0]) * soft) / len(micro)
        total = loss if total is None else total + loss
    grads = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()), create_graph=True)))
    if max_norm is not None:
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = {n: g * scale for n, g in grads.items()}
    moved = {}
    for n, w in params.items():
        d = grads[n] + decay * w
        step = d if buf is None else momentum * buf[n] + d
        moved[n] = w - lr * step
    zv = functional_call(model, (moved, {n: b.clone() for n, b in buffers.items()}), (x_val,))
    return torch.autograd.grad(F.cross_entropy(zv, y_val), lam_t)[0]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
@pytest.mark.parametrize("scheduler_first", [False, True])
@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_own_loop_hypergradient_is_the_step_taken(max_norm, scheduler_first):
    model = student()
    model.train()
    lr, momentum, decay, accumulate = 0.2, 0.8, 1e-3, 2
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # float64: scaling by powers of 2 is exact
    strategy = Recording()
    meta = MetaDistiller(model, optimizer, strategy, scaler=scaler)
    expected = []
    for step in range(4):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        buf = None if step == 0 else {n: optimizer.state[p]["momentum_buffer"].clone()
                                      for n, p in model.named_parameters()}
        lam, micro = meta.lam, batches(step, accumulate)
        optimizer.zero_grad()
        for x, y, teacher in micro:
            logits = meta.forward(x)
            scaler.scale(meta.loss(logits, teacher, y, weight=1 / accumulate)).backward()
        if max_norm is not None:
            meta.clip_grad_norm_(max_norm)
        if scheduler_first:  # the step then uses the new learning rate, and so does its hypergradient
            scheduler.step()
        step_lr = optimizer.param_groups[0]["lr"]
        x_val, y_val = validation(step)
        expected.append(oracle(model, params, buffers, buf, micro, lam, step_lr, momentum, decay, max_norm,
                               x_val, y_val))
        meta.step(x_val, y_val)
        if not scheduler_first:
            scheduler.step()
    assert meta.hypergrad_evals == 4 and len({float(h[0]) for h in strategy.seen}) == 4
    for got, want in zip(strategy.seen, expected):
        assert float(want.abs().min()) > 1e-7
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


def test_out_of_order_calls_raise():
    model = student()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = MetaDistiller(model, optimizer, Gradient(lambda1=0.5, temperature=2.0))
    (x, y, teacher), = batches(0, 1)
    with pytest.raises(OrderError, match="loss\\(\\) takes the logits"):
        meta.loss(model(x), teacher, y)
    with pytest.raises(OrderError, match="step\\(\\) comes after"):
        meta.step(*validation(0))
    logits = meta.forward(x)
    with pytest.raises(OrderError, match="forward\\(\\) twice"):
        meta.forward(x)
    meta.loss(logits, teacher, y).backward()
    optimizer.step()  # the user stepped themselves
    with pytest.raises(OrderError, match="weights moved since forward"):
        meta.step(*validation(0))


def test_strategies_without_hypergradients_and_windows_run_in_the_own_loop():
    for strategy in (Fixed(Metaparameters(0.5, 1.0), "naive"), LinearTrajectory(window=2, period=2)):
        model = student()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        meta = MetaDistiller(model, optimizer, strategy)
        for step in range(6):
            (x, y, teacher), = batches(step, 1)
            optimizer.zero_grad()
            meta.loss(meta.forward(x), teacher, y).backward()
            meta.step(*validation(step))
        wanted = sum(strategy.wants_hypergradient(t) for t in range(6))
        assert meta.hypergrad_evals == wanted
