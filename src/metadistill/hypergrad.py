"""Greedy (one-step) hypergradient of the validation loss with respect to (lambda1, T).

h = d/dlambda L_val(U(w, lambda)), where U is one optimizer step. With u = (dw'/dg) v and
v = grad L_val(w'), h = -(d^2 L_train / dlambda dw) · u, and because lambda enters only the loss head,
(d^2 L_train / dlambda dw) · u = sum over the batch of (d^2 l / dlambda dz) · (J_z u).
Three ways to get that product:
- "jvp": one Jacobian-vector product of the student logits (forward mode) and the closed-form
  mixed derivative of the loss head; no double backward.
- "fd": the original code's central finite difference of dL_train/dlambda at w +- eps u.
- "double": double backward through the train gradient (reference; about 3x cost and memory).
Nothing here changes the model's parameters or buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .jvp import ActivationRecord, logits_jvp, record_activations
from .losses import distillation_loss, mixed_derivative, validation_loss
from .meta import Metaparameters

HYPERGRADIENT_METHODS = ("jvp", "fd", "double")


def _check_method(method: str) -> None:
    if method not in HYPERGRADIENT_METHODS:
        raise ValueError(f"unknown hypergradient method {method!r}; choose one of {', '.join(HYPERGRADIENT_METHODS)}")


def _clone(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in tensors.items()}


class UpdateMap:
    """The linear map from a change of the gradient to a change of the weights in one optimizer step.

    w' = w - diag(scale) g + (terms independent of lambda), so dw'/dlambda = -scale * dg/dlambda.
    SGD (momentum, dampening, Nesterov, weight decay) is exact; Adam/AdamW hold the second-moment
    preconditioner fixed at its state after the step. Create it just before `optimizer.step()`
    and read it after.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
            raise NotImplementedError(
                f"the greedy hypergradient supports SGD, Adam and AdamW, not {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.first_step = {}
        for group in optimizer.param_groups:
            if group.get("maximize", False):
                raise NotImplementedError("the greedy hypergradient does not support maximize=True")
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                self.first_step[p] = state.get("momentum_buffer") is None

    def scales(self) -> dict[nn.Parameter, Tensor | float]:
        out: dict[nn.Parameter, Tensor | float] = {}
        for group in self.optimizer.param_groups:
            lr = float(group["lr"])
            for p in group["params"]:
                if isinstance(self.optimizer, torch.optim.SGD):
                    momentum, dampening = group["momentum"], group["dampening"]
                    if momentum == 0:
                        factor = 1.0
                    elif group["nesterov"]:
                        factor = 1.0 + momentum * (1.0 if self.first_step[p] else 1.0 - dampening)
                    else:
                        factor = 1.0 if self.first_step[p] else 1.0 - dampening
                    out[p] = lr * factor
                else:
                    state = self.optimizer.state[p]
                    beta1, beta2 = group["betas"]
                    step = float(state["step"])
                    second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
                    denom = (second / (1.0 - beta2**step)).sqrt() + group["eps"]
                    out[p] = lr * (1.0 - beta1) / (1.0 - beta1**step) / denom
        return out

    def apply(self, model: nn.Module, gradient: dict[str, Tensor]) -> dict[str, Tensor]:
        scales = self.scales()
        return {name: gradient[name] * scales[p] for name, p in model.named_parameters() if p in scales}


@dataclass
class TrainStep:
    """What the hypergradient of one real training step needs; the loop keeps it until asked."""

    model: nn.Module
    params: dict[str, Tensor]  # weights before the step
    buffers: dict[str, Tensor]  # buffers before the step
    x: Tensor
    y: Tensor
    teacher_logits: Tensor
    lam: Metaparameters
    t2_scaling: bool = False
    logits: Tensor | None = None  # the step's own logits (same object the record saw)
    record: ActivationRecord | None = None

    def forward(self, params: dict[str, Tensor]) -> Tensor:
        return functional_call(self.model, (params, _clone(self.buffers)), (self.x,))

    def loss(self, logits: Tensor, lam: Tensor) -> Tensor:
        return distillation_loss(logits, self.teacher_logits, self.y, lam[0], lam[1], self.t2_scaling)

    def lam_tensor(self, like: Tensor) -> Tensor:
        return torch.tensor(self.lam.as_tuple(), dtype=like.dtype, device=like.device)


def mixed_product(step: TrainStep, direction: dict[str, Tensor], method: str = "jvp") -> Tensor:
    """(d^2 L_train / dlambda dw) · direction at the step's weights, as a tensor [d lambda1, d T]."""
    _check_method(method)
    if method == "jvp":
        logits, tangent = logits_jvp(step.model, step.params, step.buffers, step.x, direction,
                                     step.record, step.logits)
        mixed = mixed_derivative(logits.detach(), step.teacher_logits, step.y, *step.lam.as_tuple(),
                                 t2_scaling=step.t2_scaling)
        return (mixed * tangent.unsqueeze(0)).sum(dim=(1, 2))
    if method == "fd":
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction.values()))
        # eps^(1/3) of the dtype balances truncation against round-off in a central difference.
        eps = torch.finfo(next(iter(direction.values())).dtype).eps ** (1 / 3) / max(float(norm), 1e-30)
        slopes = []
        for sign in (1.0, -1.0):
            moved = {name: p.detach() + sign * eps * direction[name] if name in direction else p.detach()
                     for name, p in step.params.items()}
            with torch.no_grad():
                logits = step.forward(moved)
            lam = step.lam_tensor(logits).requires_grad_()
            slopes.append(torch.autograd.grad(step.loss(logits, lam), lam)[0])
        return (slopes[0] - slopes[1]) / (2.0 * eps)
    params = {name: p.detach().requires_grad_(name in direction) for name, p in step.params.items()}
    names = [name for name in params if name in direction]
    logits = step.forward(params)
    lam = step.lam_tensor(logits).requires_grad_()
    grads = torch.autograd.grad(step.loss(logits, lam), [params[n] for n in names], create_graph=True)
    return torch.autograd.grad(grads, lam, grad_outputs=[direction[n] for n in names])[0]


def validation_gradient(model: nn.Module, x_val: Tensor, y_val: Tensor, t_val: float = 1.0,
                        params: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], float]:
    """(grad_w L_val, L_val) at the model's current weights (or `params`); buffers are not written."""
    if params is None:
        params = {name: p.detach() for name, p in model.named_parameters()}
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    buffers = _clone(dict(model.named_buffers()))
    loss = validation_loss(functional_call(model, (leaves, buffers), (x_val,)), y_val, t_val)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads)), float(loss.detach())


def step_hypergradient(step: TrainStep, update: Callable[[dict[str, Tensor]], dict[str, Tensor]],
                       x_val: Tensor, y_val: Tensor, t_val: float = 1.0,
                       method: str = "jvp") -> tuple[Tensor, float]:
    """Hypergradient of a real step already taken: the model holds w' = U(w, lambda).

    `update` maps grad L_val(w') to the weight direction u (the optimizer's UpdateMap). Returns
    (h, L_val(w')).
    """
    v, val_loss = validation_gradient(step.model, x_val, y_val, t_val)
    return -mixed_product(step, update(v), method), val_loss


def greedy_hypergradient(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    teacher_logits: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    lam: Metaparameters,
    lr: float,
    t_val: float = 1.0,
    method: str = "jvp",
    t2_scaling: bool = False,
) -> Tensor:
    """[dL_val/dlambda1, dL_val/dT] after one plain SGD step of size `lr` from the model's weights.

    The model is left exactly as it was (parameters and buffers, BatchNorm statistics included);
    all forward passes use the model's current train/eval mode.
    """
    _check_method(method)
    params = {name: p.detach().requires_grad_() for name, p in model.named_parameters()}
    buffers = _clone(dict(model.named_buffers()))
    step = TrainStep(model, {n: p.detach() for n, p in params.items()}, buffers, x, y,
                     teacher_logits, lam, t2_scaling)
    with record_activations(model) as record:
        logits = functional_call(model, (params, _clone(buffers)), (x,))
    step.logits, step.record = logits, record
    loss = distillation_loss(logits, teacher_logits, y, lam.lambda1, lam.temperature, t2_scaling)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    moved = {name: p.detach() - lr * grads[name] for name, p in params.items()}
    v, _ = validation_gradient(model, x_val, y_val, t_val, params=moved)
    return -mixed_product(step, {name: lr * g for name, g in v.items()}, method)
