"""MetaDistiller: a metaparameter strategy inside a training loop the user owns (AMP, clipping, accumulation).

The object owns the ordering the hypergradient needs, and refuses any other order:

    meta = MetaDistiller(student, optimizer, Gradient(), scaler=scaler)       # scaler: optional
    for x, y in loader:
        with torch.no_grad():
            teacher_logits = teacher(x)                  # on the same (augmented) batch
        with torch.autocast("cpu", dtype=torch.bfloat16):              # optional
            logits = meta.forward(x)                     # instead of student(x)
            loss = meta.loss(logits, teacher_logits, y)  # lambda1, T of this step
        scaler.scale(loss).backward()                    # or loss.backward()
        meta.clip_grad_norm_(1.0)                        # optional, instead of torch's
        meta.step(x_val, y_val)                          # the optimizer step, then lambda for the next one
        scheduler.step()                                 # any LR schedule, before or after meta.step()

`step` reads the update map around the optimizer step it takes (so the learning rate is the one the step
used, whatever the scheduler does), unscales a GradScaler's gradients first, and skips the hypergradient
of a step the scaler skipped (non-finite gradients). Gradient accumulation: several forward/loss/backward
rounds before one `step`, each `loss(..., weight=1/k)`. The hypergradient is exact for SGD (momentum,
Nesterov, weight decay) and Adam/AdamW (the update map of `updates.UpdateMap`), and through
`clip_grad_norm_` (the clip factor's own dependence on lambda included). Validation runs in the model's
current mode (train mode: BatchNorm normalises with the validation batch's statistics).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .losses import distillation_loss
from .meta import Metaparameters
from .steps import Runs, TakenStep, forward_keeping, validation_gradient
from .strategies import Strategy
from .updates import UpdateMap

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: clip_coef = max_norm / (total_norm + 1e-6)


class OrderError(RuntimeError):
    """MetaDistiller's methods were called in an order that would make the hypergradient wrong."""


class MetaDistiller:
    """Drives `strategy` (Gradient, LinearTrajectory, Fixed, ...) in the user's own loop: see the module docstring.

    `lam` is the metaparameters of the current step; `hypergrad_evals` counts the hypergradients computed.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, strategy: Strategy, *, seed: int = 0,
                 t_val: float = 1.0, t2_scaling: bool = False, scaler: torch.amp.GradScaler | None = None,
                 adam_update: str = "exact") -> None:
        if getattr(strategy, "horizon", None) is not None:
            raise ValueError("MetaDistiller computes the greedy hypergradient; use fit() for the online methods")
        self.model, self.optimizer, self.strategy, self.scaler = model, optimizer, strategy, scaler
        self.t_val, self.t2_scaling, self.adam_update = t_val, t2_scaling, adam_update
        self.lam: Metaparameters = strategy.start(seed)
        self.step_index = 0
        self.hypergrad_evals = 0
        self._reset()

    def _reset(self) -> None:
        self.phase = "idle"  # idle -> forward -> loss (-> forward -> loss ...) -> [clipped] -> idle
        self.pending: tuple | None = None  # what forward() kept, until loss() pairs it with its batch
        self.parts: list[tuple[TakenStep, float]] = []  # the step's micro-batches and their loss weights
        self.before: dict[str, Tensor] | None = None
        self.unscaled = False
        self.clip: tuple[float, dict[str, Tensor]] | None = None  # (max_norm, the gradient before clipping)

    def _wants(self) -> bool:
        return self.strategy.wants_hypergradient(self.step_index)

    def forward(self, x: Tensor) -> Tensor:
        """The student's logits on x, keeping (when this step's hypergradient is wanted) what it needs."""
        if self.phase == "forward":
            raise OrderError("forward() twice without loss(): call loss() on the logits of each forward()")
        logits, kept = forward_keeping(self.model, x, self._wants())
        if kept is not None and self.before is None:
            self.before = kept[0]
        self.pending = (x, logits, kept)
        self.phase = "forward"
        return logits

    def loss(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, weight: float = 1.0) -> Tensor:
        """The distillation loss of the logits forward() returned, with this step's lambda, times `weight`
        (1/k for k accumulated micro-batches)."""
        if self.phase != "forward" or self.pending is None or student_logits is not self.pending[1]:
            raise OrderError("loss() takes the logits that the last forward() returned")
        x, logits, kept = self.pending
        loss = distillation_loss(logits, teacher_logits, targets, self.lam.lambda1, self.lam.temperature,
                                 self.t2_scaling)
        if kept is not None:
            params, buffers, record, rng = kept
            self.parts.append((TakenStep(self.model, Runs(), params, buffers, x, targets, teacher_logits.detach(),
                                         self.lam.lambda1, self.lam.temperature, self.t2_scaling, logits, record,
                                         rng, None), weight))  # type: ignore[arg-type]
        self.pending, self.phase = None, "loss"
        return loss * weight if weight != 1.0 else loss

    def _unscale(self) -> None:
        if self.scaler is not None and not self.unscaled:
            self.scaler.unscale_(self.optimizer)
            self.unscaled = True

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ on the student's gradients (unscaled first), remembered for the
        hypergradient; returns the total norm before clipping."""
        if self.phase != "loss":
            raise OrderError("clip_grad_norm_() comes after the backward pass of loss() and before step()")
        self._unscale()
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], max_norm)
        self.clip = (float(max_norm), grads)
        self.phase = "clipped"
        return norm

    def step(self, x_val: Tensor | None = None, y_val: Tensor | None = None) -> Metaparameters:
        """The optimizer step (through the scaler if there is one), then the strategy's lambda for the next
        step, from the hypergradient on the validation batch (x_val, y_val) where the strategy wants one."""
        if self.phase not in ("loss", "clipped"):
            raise OrderError("step() comes after forward(), loss() and the backward pass")
        if self.before is not None and any(not torch.equal(p.detach(), self.before[n])
                                           for n, p in self.model.named_parameters()):
            raise OrderError("the weights moved since forward(): let meta.step() take the optimizer step")
        self._unscale()
        update = UpdateMap(self.optimizer, self.adam_update)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        update.finish()
        skipped = self.before is not None and all(torch.equal(p.detach(), self.before[n])
                                                  for n, p in self.model.named_parameters())
        parts, clip = self.parts, self.clip

        def hypergradient() -> Tensor:
            if not parts or skipped or x_val is None or y_val is None:
                raise OrderError("no hypergradient for this step: pass step(x_val, y_val), and (the scaler skipped "
                                 "it?) take a step that moves the weights")
            self.hypergrad_evals += 1
            return self._hypergradient(parts, update, clip, x_val, y_val)

        wanted = self._wants() and not skipped
        self.lam = self.strategy.advance(self.step_index, hypergradient if wanted else _refuse)
        self.step_index += 1
        self._reset()
        return self.lam

    def _hypergradient(self, parts: list[tuple[TakenStep, float]], update: UpdateMap,
                       clip: tuple[float, dict[str, Tensor]] | None, x_val: Tensor, y_val: Tensor) -> Tensor:
        """h = -(d w'/d lambda)^T v, summed over the step's micro-batches; with clipping, g_c = g * s(g) and
        d g_c = s dg - g c (g . dg) / (|g| (|g| + eps)^2) where the clip was active."""
        v, _ = validation_gradient(self.model, Runs(), x_val, y_val, self.t_val)
        u = update.apply(self.model, v)
        for taken, _ in parts:
            taken.update = update
        along_u = sum(weight * taken.mixed_product(u)[0] for taken, weight in parts)
        if clip is None:
            return -along_u.detach()
        max_norm, g = clip
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in g.values())))
        scale = max_norm / (norm + CLIP_EPS)
        if scale >= 1.0:
            return -along_u.detach()
        g = {n: t for n, t in g.items() if n in u}
        along_g = sum(weight * taken.mixed_product(g)[0] for taken, weight in parts)
        u_dot_g = sum(float((u[n].double() * g[n].double()).sum()) for n in u)
        return -(scale * along_u - u_dot_g * max_norm / (norm * (norm + CLIP_EPS) ** 2) * along_g).detach()


def _refuse() -> Tensor:
    raise OrderError("the strategy asked for a hypergradient at a step where it said it would not")
