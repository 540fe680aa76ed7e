"""A real training step of R >= 1 runs, and the `TakenStep` that can still answer for its hypergradient.

Vocabulary: a *step* is one optimizer update of the student; `take_step` takes it; a `TakenStep` is a
step already taken that keeps what its hypergradient needs (the weights and buffers before it, its
batch, its metaparameters, the activations and RNG state of its forward pass, and its `UpdateMap`).

R runs share one model in one of two layouts (`Runs`): a single run uses the student as it is
(inputs [B, ...], logits [B, K]); R stacked runs use `stacked.stack_models` (inputs [B, R, ...],
logits [B, R, K]), where run r's weights receive exactly run r's gradient. Either way the loss of
the step is the sum of the per-run batch means, and every per-run quantity is a tensor [R].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .jvp import ActivationRecord, RngState, capture_rng, jvp_kernels, logits_jvp, record_activations, replay_rng
from .losses import distillation_loss, mixed_derivative, validation_loss
from .meta import Metaparameters
from .updates import UpdateMap

HYPERGRADIENT_METHODS = ("jvp", "fd", "double")


def check_method(method: str) -> None:
    if method not in HYPERGRADIENT_METHODS:
        raise ValueError(f"unknown hypergradient method {method!r}; choose one of {', '.join(HYPERGRADIENT_METHODS)}")


def clone_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in tensors.items()}


@dataclass(frozen=True)
class Runs:
    """The run axis of a model: `count` runs, `stacked` (inputs [B, R, ...]) or a single plain model."""

    count: int = 1
    stacked: bool = False

    def shared(self, x: Tensor) -> Tensor:
        """The same samples for every run (evaluation, the validation set of a standalone hypergradient)."""
        if not self.stacked:
            return x
        return x.unsqueeze(1).expand(x.shape[0], self.count, *x.shape[1:]).contiguous()

    def by_run(self, t: Tensor) -> Tensor:
        """Logits [B, K] or [B, R, K] (or labels [B] / [B, R]) as [B, R, ...]."""
        return t if self.stacked else t.unsqueeze(1)

    def metaparameters(self, lams: list[Metaparameters], like: Tensor) -> tuple[float | Tensor, float | Tensor]:
        """(lambda1, T) as the loss takes them: floats for a single run, tensors [R] for stacked runs."""
        if not self.stacked:
            return lams[0].lambda1, lams[0].temperature
        values = torch.tensor([lam.as_tuple() for lam in lams], dtype=like.dtype, device=like.device)
        return values[:, 0], values[:, 1]

    def losses(self, loss: Tensor) -> Tensor:
        """A loss as the R per-run values [R]."""
        return loss.reshape(self.count)

    def parts(self, t: Tensor, lead: int = 0) -> Tensor:
        """A weight-shaped tensor ([*lead dims, *param shape]) as [*lead dims, R, the run's values]. Stacked
        weights keep the runs in their first dimension (grouped convolutions and BatchNorm run-major along
        channels, StackedLinear along its run axis)."""
        return t.reshape(*t.shape[:lead], self.count, -1)

    def per_run_sum(self, products: dict[str, Tensor], lead: int = 0) -> Tensor:
        """Sum over the weights of each run's part of `products` ([*lead dims, *param shape] per name) ->
        [*lead dims, R]."""
        parts = [self.parts(t, lead).sum(-1) for t in products.values()]
        if not parts:
            raise ValueError("the model has no trainable weights")
        return torch.stack(parts).sum(0)


@dataclass
class TakenStep:
    """A real step already taken, with what its hypergradient needs."""

    model: nn.Module
    runs: Runs
    params: dict[str, Tensor]  # weights before the step
    buffers: dict[str, Tensor]  # buffers before the step
    x: Tensor
    y: Tensor
    teacher_logits: Tensor
    lambda1: float | Tensor
    temperature: float | Tensor
    t2_scaling: bool
    logits: Tensor  # the step's own logits (the object the record saw)
    record: ActivationRecord | None
    rng: RngState | None  # the RNG state before the step's forward pass (its dropout masks are replayed from it)
    update: UpdateMap
    gradient_tangent: dict[str, Tensor] | None = None  # d grad / dlambda ([2, *shape] per weight), if computed

    def mixed_gradients(self) -> dict[str, Tensor]:
        """B = d2 L_train / (dw dlambda) = J_z^T (d2 l / dlambda dz) per trainable weight [2, *shape], through the
        step's own graph (call before the weights move)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(self.logits, params, self.mixed(self.logits), is_grads_batched=True,
                                    allow_unused=True)
        return {n: torch.zeros(2, *p.shape, dtype=p.dtype, device=p.device) if g is None else g
                for n, p, g in zip(names, params, grads)}

    def forward(self, params: dict[str, Tensor]) -> Tensor:
        """The step's forward pass at `params`: its buffers (cloned), its dropout masks."""
        with replay_rng(self.rng), jvp_kernels():
            return functional_call(self.model, (params, clone_tensors(self.buffers)), (self.x,))

    def loss(self, logits: Tensor, lam: Tensor) -> Tensor:
        """The per-run losses [R] with lambda = lam ([2] or [R, 2]) as a tensor (differentiable in it)."""
        lambda1, temperature = (lam[0], lam[1]) if lam.dim() == 1 else (lam[:, 0], lam[:, 1])
        return self.runs.losses(distillation_loss(logits, self.teacher_logits, self.y, lambda1, temperature,
                                                  self.t2_scaling))

    def lam_tensor(self, like: Tensor) -> Tensor:
        """lambda as a tensor [2] (single run) or [R, 2]."""
        if isinstance(self.lambda1, Tensor):
            return torch.stack([self.lambda1, self.temperature], dim=1).to(like.dtype)
        return torch.tensor([self.lambda1, self.temperature], dtype=like.dtype, device=like.device)

    def mixed(self, logits: Tensor) -> Tensor:
        """d^2 l / (dlambda dz) at `logits`: [2, B, K] or [2, B, R, K]."""
        stacked = isinstance(self.lambda1, Tensor)
        lambda1 = self.lambda1.unsqueeze(-1) if stacked else self.lambda1
        temperature = self.temperature.unsqueeze(-1) if stacked else self.temperature
        return mixed_derivative(logits.detach(), self.teacher_logits, self.y, lambda1, temperature, self.t2_scaling)

    def mixed_product(self, direction: dict[str, Tensor], method: str = "jvp") -> Tensor:
        """(d^2 L_train / dlambda dw) . direction at the step's weights, per run: [R, 2]."""
        check_method(method)
        if method == "jvp":
            logits, tangent = logits_jvp(self.model, self.params, self.buffers, self.x, direction, self.record,
                                         self.logits, rng=self.rng)
            product = self.mixed(logits) * tangent.unsqueeze(0)
            return product.sum(dim=(1, 3)).T if self.runs.stacked else product.sum(dim=(1, 2)).unsqueeze(0)
        if self.runs.stacked:
            raise ValueError("stacked runs compute hypergradients by the jvp method only")
        if method == "fd":
            return self._finite_difference(direction).unsqueeze(0)
        params = {name: p.detach().requires_grad_(name in direction) for name, p in self.params.items()}
        names = [name for name in params if name in direction]
        lam = self.lam_tensor(self.logits).requires_grad_()
        grads = torch.autograd.grad(self.loss(self.forward(params), lam).sum(), [params[n] for n in names],
                                    create_graph=True)
        return torch.autograd.grad(grads, lam, grad_outputs=[direction[n] for n in names])[0].unsqueeze(0)

    def _finite_difference(self, direction: dict[str, Tensor]) -> Tensor:
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction.values()))
        # eps^(1/3) of the dtype balances truncation against round-off in a central difference.
        eps = torch.finfo(next(iter(direction.values())).dtype).eps ** (1 / 3) / max(float(norm), 1e-30)
        slopes = []
        for sign in (1.0, -1.0):
            moved = {name: p.detach() + sign * eps * direction[name] if name in direction else p.detach()
                     for name, p in self.params.items()}
            with torch.no_grad():
                logits = self.forward(moved)
            lam = self.lam_tensor(logits).requires_grad_()
            slopes.append(torch.autograd.grad(self.loss(logits, lam).sum(), lam)[0])
        return (slopes[0] - slopes[1]) / (2.0 * eps)


def forward_keeping(model: nn.Module, x: Tensor, keep: bool, call: Callable[[Tensor], Tensor] | None = None
                    ) -> tuple[Tensor, tuple[dict[str, Tensor], dict[str, Tensor], ActivationRecord, object] | None]:
    """The logits of `call` (default: the model) on x; with `keep`, also what the step's hypergradient needs:
    the weights and buffers before the step, the activations of this forward pass and its RNG state."""
    call = call or model
    if not keep:
        return call(x), None
    params = clone_tensors(dict(model.named_parameters()))
    buffers = clone_tensors(dict(model.named_buffers()))
    rng = capture_rng(x.device)
    with record_activations(model) as record, jvp_kernels():
        logits = call(x)
    return logits, (params, buffers, record, rng)


def take_step(model: nn.Module, optimizer: torch.optim.Optimizer, runs: Runs, x: Tensor, y: Tensor,
              teacher_logits: Tensor | None, lams: list[Metaparameters], t2_scaling: bool = False, keep: bool = False,
              call: Callable[[Tensor], Tensor] | None = None, loss_weight: float = 1.0,
              adam_update: str = "exact", mixed_gradient: bool = False,
              curvature_along: dict[str, Tensor] | None = None) -> tuple[Tensor, TakenStep | None]:
    """One real distillation step of every run: forward, the per-run losses, backward of their sum (times
    `loss_weight`), the optimizer step. Returns (the per-run losses [R], detached; the TakenStep when
    `keep`). `call` is what runs the forward pass (a DistributedDataParallel wrapper, say).

    Through the step's own graph, before the weights move (`keep` only): with `mixed_gradient`, B = d2 L /
    (dw dlambda) (`TakenStep.gradient_tangent`); with `curvature_along` = Z ([2, *shape] per weight), H Z + B,
    the change of the gradient along (Z, lambda) by double backward (the step's backward keeps its graph).
    """
    logits, kept = forward_keeping(model, x, keep, call)
    lambda1, temperature = runs.metaparameters(lams, logits)
    curvature = keep and curvature_along is not None
    if curvature:
        lam = torch.stack([torch.as_tensor(lambda1), torch.as_tensor(temperature)], -1).to(logits).requires_grad_()
        lambda1, temperature = lam[..., 0], lam[..., 1]
    losses = runs.losses(distillation_loss(logits, teacher_logits, y, lambda1, temperature, t2_scaling))
    optimizer.zero_grad(set_to_none=True)
    total = losses.sum() * loss_weight if loss_weight != 1.0 else losses.sum()
    if curvature:
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(total, [p for _, p in trainable] + [lam], create_graph=True)
        for (_, p), g in zip(trainable, grads):
            p.grad = g.detach()
    else:
        total.backward(retain_graph=keep and mixed_gradient)
    taken = None
    if kept is not None:
        params, buffers, record, rng = kept
        taken = TakenStep(model, runs, params, buffers, x, y, teacher_logits, lambda1, temperature, t2_scaling,
                          logits, record, rng, UpdateMap(optimizer, adam_update))
        if curvature:
            taken.lambda1, taken.temperature = _plain(lambda1), _plain(temperature)
            taken.gradient_tangent = _curvature(trainable, grads, curvature_along)
        elif mixed_gradient:
            taken.gradient_tangent = taken.mixed_gradients()
    optimizer.step()
    if taken is not None:
        taken.update.finish()
    return losses.detach(), taken


def _plain(value: Tensor) -> float | Tensor:
    """A metaparameter as the loss takes it without a graph: a float (single run, 0-d) or a tensor [R]."""
    return float(value.detach()) if value.dim() == 0 else value.detach()


def _curvature(trainable: list[tuple[str, Tensor]], grads: tuple[Tensor, ...], z: dict[str, Tensor]
               ) -> dict[str, Tensor]:
    """H Z + B from the step's gradient graph: column c is grad_w of (g . Z[c] + dL/dlambda_c)."""
    *weights, lam_grad = grads
    columns = []
    for c in range(2):
        scalar = lam_grad[..., c].sum()
        for (name, _), g in zip(trainable, weights):
            if name in z:
                scalar = scalar + (g * z[name][c]).sum()
        columns.append(scalar)
    params = [p for _, p in trainable]
    units = torch.eye(2, dtype=lam_grad.dtype, device=lam_grad.device)
    out = torch.autograd.grad(torch.stack(columns), params, units, is_grads_batched=True, allow_unused=True)
    return {name: torch.zeros(2, *p.shape, dtype=p.dtype, device=p.device) if g is None else g
            for (name, p), g in zip(trainable, out)}


def validation_gradient(model: nn.Module, runs: Runs, x_val: Tensor, y_val: Tensor, t_val: float = 1.0,
                        params: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """(grad_w of the per-run validation losses' sum, the losses [R]) at the model's weights (or `params`);
    buffers are not written. Run r's weights get exactly run r's validation gradient."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if params is None:
        params = dict(model.named_parameters())
    leaves = {name: p.detach().requires_grad_(name in trainable) for name, p in params.items()}
    buffers = clone_tensors(dict(model.named_buffers()))
    losses = runs.losses(validation_loss(functional_call(model, (leaves, buffers), (x_val,)), y_val, t_val))
    grads = torch.autograd.grad(losses.sum(), [leaves[n] for n in trainable], allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(trainable, grads)}, losses.detach()
