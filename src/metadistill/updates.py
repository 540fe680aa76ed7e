"""How one optimizer step moves the weights when its gradient moves: the update map of SGD and Adam.

A step maps the gradient g (a function of lambda) to new weights w'. Its derivative is what every
hypergradient needs:
- the greedy hypergradient needs dw'/dg with everything before the step held constant: a diagonal
  map (`UpdateMap.apply`), exact for SGD (momentum, dampening, Nesterov, weight decay) and for
  Adam/AdamW, whose second moment depends on g too (the derivative of g / sqrt(v(g)) is taken);
- the long-horizon (online) hypergradient needs the step's tangent map: with Z = dw/dlambda and the
  optimizer's state tangents (the momentum buffer's, or Adam's two moments'), dw'/dlambda from
  dg/dlambda (`UpdateMap.tangent`).
The map is read around the real step: construct it after backward() and before optimizer.step(),
call `finish()` right after the step; it keeps what it needs, so later steps, LR schedulers or
zero_grad() do not change it. Parameters without a gradient (frozen, or unused by the loss) are
skipped by the optimizer and have no entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

ADAM_UPDATES = ("exact", "fixed_second_moment")
Tangents = dict[str, Tensor]  # per parameter name, [2, *shape]: d/dlambda1 and d/dT


@dataclass
class _Entry:
    """One parameter's step: the hyperparameters and the state the derivative reads."""

    group: dict  # the step's hyperparameters (lr, momentum, betas, ...), as they were at the step
    first: bool  # SGD: no momentum buffer before the step
    grad: Tensor | None = None  # Adam: the gradient the step used (weight decay included)
    exp_avg: Tensor | None = None  # Adam: first moment after the step
    second: Tensor | None = None  # Adam: the second moment the step divided by (max_exp_avg_sq with amsgrad)
    max_before: Tensor | None = None  # Adam amsgrad: the running max before the step
    second_moved: Tensor | None = None  # Adam amsgrad: where the step's own second moment became the max
    step: float = 0.0  # Adam: the step count after the step

    @property
    def lr(self) -> float:
        return float(self.group["lr"])

    @property
    def weight_decay(self) -> float:
        return float(self.group["weight_decay"])


class UpdateMap:
    """The derivative of one real optimizer step in its gradient (see the module docstring).

    `adam="exact"` (default) differentiates Adam's division by the square root of its second moment
    too; `"fixed_second_moment"` holds the denominator fixed (the approximation used before; kept to
    measure its error, bench/adam_update_map.py).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, adam: str = "exact") -> None:
        if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
            raise NotImplementedError(
                f"hypergradients support the SGD, Adam and AdamW optimizers, not {type(optimizer).__name__}")
        if adam not in ADAM_UPDATES:
            raise ValueError(f"adam must be one of {', '.join(ADAM_UPDATES)}, got {adam!r}")
        self.optimizer, self.adam = optimizer, adam
        self.sgd = isinstance(optimizer, torch.optim.SGD)
        self.decoupled = isinstance(optimizer, torch.optim.AdamW)
        self.entries: dict[nn.Parameter, _Entry] = {}
        for group in optimizer.param_groups:
            if group.get("maximize", False):
                raise NotImplementedError("hypergradients do not support maximize=True")
            for p in group["params"]:
                if p.grad is None:
                    continue  # the optimizer skips it: no update direction
                state = optimizer.state.get(p, {})
                entry = _Entry({k: v for k, v in group.items() if k != "params"}, state.get("momentum_buffer") is None)
                if not self.sgd:
                    grad = p.grad.detach()
                    if entry.weight_decay and not self.decoupled:
                        grad = grad + entry.weight_decay * p.detach()
                    entry.grad = grad.clone()
                    if group.get("amsgrad") and "max_exp_avg_sq" in state:
                        entry.max_before = state["max_exp_avg_sq"].clone()
                self.entries[p] = entry

    def finish(self) -> UpdateMap:
        """Read the state the step left (call right after optimizer.step())."""
        if self.sgd:
            return self
        for p, entry in self.entries.items():
            state = self.optimizer.state[p]
            entry.step = float(state["step"])
            entry.exp_avg = state["exp_avg"].clone()
            if entry.group.get("amsgrad"):
                entry.second = state["max_exp_avg_sq"].clone()
                before = 0.0 if entry.max_before is None else entry.max_before
                entry.second_moved, entry.max_before = state["exp_avg_sq"] >= before, None
            else:
                entry.second = state["exp_avg_sq"].clone()
        return self

    # ------------------------------------------------------------------ greedy: a diagonal map
    def scale(self, p: nn.Parameter) -> Tensor | float:
        """dw'/dg of parameter p, element-wise (w' = w - scale * g + terms constant in g)."""
        entry = self.entries[p]
        group = entry.group
        if self.sgd:
            momentum, dampening = group["momentum"], group["dampening"]
            if momentum == 0:
                factor = 1.0
            elif group["nesterov"]:
                factor = 1.0 + momentum * (1.0 if entry.first else 1.0 - dampening)
            else:
                factor = 1.0 if entry.first else 1.0 - dampening
            return entry.lr * factor
        zero = torch.zeros_like(entry.grad)
        return entry.lr * self._adam_step_tangent(entry, group, zero, zero, entry.grad.new_ones(()))[0]

    def apply(self, model: nn.Module, gradient: dict[str, Tensor]) -> dict[str, Tensor]:
        """The weight direction u = (dw'/dg)^T v for v = `gradient` (the map is diagonal, so also dw'/dg v)."""
        return {name: gradient[name] * self.scale(p) for name, p in model.named_parameters() if p in self.entries}

    # ------------------------------------------------------------------ online: the tangent map
    def tangent(self, model: nn.Module, z: Tangents, d_grad: Tangents, state: dict[str, dict[str, Tensor]]
                ) -> Tangents:
        """Z' = dw'/dlambda from Z = dw/dlambda and d_grad = dg/dlambda (both [2, *shape] per parameter);
        `state` holds the optimizer state's tangents per parameter and is updated in place."""
        out = {}
        for name, p in model.named_parameters():
            if p not in self.entries or name not in d_grad:
                continue
            entry = self.entries[p]
            group = entry.group
            zp = z.get(name, torch.zeros_like(d_grad[name]))
            own = state.setdefault(name, {})
            if self.sgd:
                out[name] = zp - entry.lr * self._sgd_step_tangent(entry, group, zp, d_grad[name], own)
                continue
            d = d_grad[name] if self.decoupled else d_grad[name] + entry.weight_decay * zp
            step, own["exp_avg"], own["second"] = self._adam_step_tangent(
                entry, group, own.get("exp_avg", torch.zeros_like(d)), own.get("second", torch.zeros_like(d)), d)
            shrink = 1.0 - entry.lr * entry.weight_decay if self.decoupled else 1.0
            out[name] = shrink * zp - entry.lr * step
        return out

    @staticmethod
    def _sgd_step_tangent(entry: _Entry, group: dict, z: Tensor, d_grad: Tensor, own: dict[str, Tensor]) -> Tensor:
        d = d_grad + entry.weight_decay * z if entry.weight_decay else d_grad
        momentum, dampening = group["momentum"], group["dampening"]
        if momentum == 0:
            return d
        if entry.first or "buffer" not in own:
            buffer = d if entry.first else (1.0 - dampening) * d
        else:
            buffer = momentum * own["buffer"] + (1.0 - dampening) * d
        own["buffer"] = buffer
        return d + momentum * buffer if group["nesterov"] else buffer

    def _adam_step_tangent(self, entry: _Entry, group: dict, d_first: Tensor, d_second: Tensor, d_grad: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
        """(d step / dlambda, d first moment, d second moment) of u = m_hat / (sqrt(v_hat) + eps)."""
        beta1, beta2 = group["betas"]
        correction1, correction2 = 1.0 - beta1**entry.step, 1.0 - beta2**entry.step
        d_first = beta1 * d_first + (1.0 - beta1) * d_grad
        d_own = beta2 * d_second + 2.0 * (1.0 - beta2) * entry.grad * d_grad
        if entry.second_moved is not None:  # amsgrad: the running max moves only where the new moment won
            d_second = torch.where(entry.second_moved, d_own, d_second)
        else:
            d_second = d_own
        root = (entry.second / correction2).sqrt()
        denom = root + group["eps"]
        step = d_first / correction1 / denom
        if self.adam == "exact":
            # d sqrt(v_hat) = d v_hat / (2 sqrt(v_hat)); where v_hat = 0 the gradient was 0 and so is its change
            d_root = torch.where(root > 0, d_second / correction2 / (2.0 * root.clamp_min(1e-38)), 0.0)
            step = step - entry.exp_avg / correction1 / denom**2 * d_root
        return step, d_first, d_second
