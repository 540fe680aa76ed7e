"""Hypergradients of the validation loss with respect to (lambda1, T): greedy, unrolled and online.

All three are one forward-mode machinery with different horizons. With Z_t = dw_t / dlambda (a
[2, *shape] tangent per weight), an optimizer step w' = U(w, g(w, lambda)) carries it forward as
    Z' = (dU/dw) Z + (dU/dg) (H Z + B),   H = d2 L_train / dw2,   B = d2 L_train / (dw dlambda),
and the hypergradient after the step is h = grad_w L_val(w')^T Z'.
- greedy (the paper's): Z = 0 before the step, so h = -(B^T u) with u = (dU/dg)^T grad L_val(w').
  Because lambda enters only the loss head, B^T u is sum_batch (d2 l / dlambda dz) . (J_z u): one
  Jacobian-vector product of the logits ("jvp"), or the original code's central finite difference
  ("fd"), or double backward ("double", a reference).
- unrolled: K steps from the current weights with lambda held fixed (`unrolled_hypergradient`), the
  exact derivative of L_val after K steps, accumulated forward (not by backpropagating the steps).
- online (real-time): Z carried along the real trajectory (`OnlineTangent`), decayed by gamma before
  every step (gamma = 0 is the greedy hypergradient); lambda's own earlier changes are not part of Z.
H Z + B is one forward-over-reverse product per column of Z ("exact"), or B alone ("identity": the
step's curvature is dropped, which treats every earlier step's effect on w as surviving unchanged).
Nothing here changes the model's parameters or buffers.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .jvp import capture_rng, jvp_kernels, record_activations, replay_rng
from .losses import distillation_loss, loss_terms
from .meta import Metaparameters
from .steps import HYPERGRADIENT_METHODS, Runs, TakenStep, check_method, clone_tensors, take_step, validation_gradient
from .updates import Tangents, UpdateMap

HESSIANS = ("exact", "identity")

__all__ = ["HESSIANS", "HYPERGRADIENT_METHODS", "OnlineTangent", "UpdateMap", "greedy", "greedy_hypergradient",
           "unrolled_hypergradient"]


def greedy(taken: TakenStep, v: dict[str, Tensor], method: str = "jvp") -> Tensor:
    """The greedy hypergradients [R, 2] of a step already taken, from v = grad L_val at its new weights."""
    return -taken.mixed_product(taken.update.apply(taken.model, v), method)


def greedy_hypergradient(model: nn.Module, x: Tensor, y: Tensor, teacher_logits: Tensor, x_val: Tensor, y_val: Tensor,
                         lam: Metaparameters, lr: float, t_val: float = 1.0, method: str = "jvp",
                         t2_scaling: bool = False) -> Tensor:
    """[dL_val/dlambda1, dL_val/dT] after one plain SGD step of size `lr` from the model's weights.

    The model is left exactly as it was (parameters and buffers, BatchNorm statistics included); all
    forward passes use the model's current train/eval mode. Frozen weights (requires_grad=False) do not
    move. The result is a detached tensor.
    """
    check_method(method)
    runs = Runs()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    params = {name: p.detach().requires_grad_(name in trainable) for name, p in model.named_parameters()}
    buffers = clone_tensors(dict(model.named_buffers()))
    rng = capture_rng(x.device)
    with record_activations(model) as record, jvp_kernels():
        logits = functional_call(model, (params, clone_tensors(buffers)), (x,))
    loss = distillation_loss(logits, teacher_logits, y, lam.lambda1, lam.temperature, t2_scaling)
    grads = dict(zip(trainable, torch.autograd.grad(loss, [params[n] for n in trainable])))
    moved = {name: p.detach() - lr * grads[name] if name in grads else p.detach() for name, p in params.items()}
    v, _ = validation_gradient(model, runs, x_val, y_val, t_val, params=moved)
    step = TakenStep(model, runs, {n: p.detach() for n, p in params.items()}, buffers, x, y, teacher_logits,
                     lam.lambda1, lam.temperature, t2_scaling, logits, record, rng, None)  # type: ignore[arg-type]
    return -step.mixed_product({name: lr * g for name, g in v.items()}, method)[0].detach()


def _functional_buffers(model: nn.Module, buffers: dict[str, Tensor]) -> dict[str, Tensor | None]:
    """The buffers for a forward pass inside torch.func transforms: the running statistics of BatchNorm
    layers in training mode are left out (None), since their in-place update cannot be transformed and
    a training-mode BatchNorm normalises with batch statistics anyway."""
    out: dict[str, Tensor | None] = clone_tensors(buffers)
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                key = f"{prefix}.{name}" if prefix else name
                if key in out:
                    out[key] = None
    return out


def gradient_tangents(taken: TakenStep, z: Tangents, hessian: str = "exact") -> Tangents:
    """d grad_w L_train / dlambda along the trajectory: H Z + B ("exact") or B ("identity"), at the step's
    weights and batch, per trainable weight [2, *shape] (column c: lambda1, T)."""
    if hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {', '.join(HESSIANS)}, got {hessian!r}")
    names = [name for name, p in taken.model.named_parameters() if p in taken.update.entries]
    frozen = {name: p for name, p in taken.params.items() if name not in names}
    buffers = _functional_buffers(taken.model, taken.buffers)
    lam = taken.lam_tensor(taken.logits)

    def forward(params: dict[str, Tensor]) -> Tensor:
        return functional_call(taken.model, ({**frozen, **params}, buffers), (taken.x,))

    primal = {name: taken.params[name] for name in names}
    if hessian == "identity":
        params = {name: p.detach().requires_grad_() for name, p in primal.items()}
        with replay_rng(taken.rng), jvp_kernels():
            logits = forward(params)
        grads = torch.autograd.grad(logits, list(params.values()), taken.mixed(logits), is_grads_batched=True)
        return dict(zip(names, grads))

    def loss(params: dict[str, Tensor], lam: Tensor) -> Tensor:
        lambda1, temperature = (lam[0], lam[1]) if lam.dim() == 1 else (lam[:, 0], lam[:, 1])
        hard, soft = loss_terms(forward(params), taken.teacher_logits, taken.y, temperature, taken.t2_scaling)
        return (lambda1 * hard + (1.0 - lambda1) * soft).sum()

    def column(z_column: dict[str, Tensor], lam_column: Tensor) -> dict[str, Tensor]:
        return torch.func.jvp(torch.func.grad(loss), (primal, lam), (z_column, lam_column))[1]

    units = torch.eye(2, dtype=lam.dtype, device=lam.device)
    lam_tangents = units if lam.dim() == 1 else units.unsqueeze(1).expand(2, *lam.shape)
    tangents = {name: z[name] if name in z else torch.zeros(2, *p.shape, dtype=p.dtype, device=p.device)
                for name, p in primal.items()}
    with replay_rng(taken.rng), jvp_kernels():
        return torch.func.vmap(column, randomness="same")(tangents, lam_tangents)


class OnlineTangent:
    """Z = dw/dlambda (and the optimizer state's tangents) carried along the real trajectory of R runs.

    Before each step Z is multiplied by `gamma` (gamma = 0: the greedy hypergradient), and reset to 0
    when the previous step was not tracked (a gap, e.g. a prediction window). `hypergradient(v)` is
    v^T Z per run.

    Where the trajectory is unstable along lambda (a step size beyond 2 / the curvature in some direction of
    Z, which gamma < 1 damps only by gamma per step), Z grows geometrically, and once it is not finite,
    gamma * Z is not either: every later hypergradient is lost (run 0 of the exact online Fashion-MNIST row
    failed so, 34 of 666 hypergradients not finite by step 665). A run whose Z or optimizer-state tangents
    stop being finite therefore starts them again from 0
    (the greedy hypergradient at that step, then the horizon grows again), counted in `restarts`; the other
    runs of a batch keep theirs. While Z is finite nothing changes: the exact derivative is untouched.
    """

    def __init__(self, gamma: float = 1.0, hessian: str = "exact") -> None:
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {', '.join(HESSIANS)}, got {hessian!r}")
        self.gamma, self.hessian = gamma, hessian
        self.z: Tangents = {}
        self.state: dict[str, dict[str, Tensor]] = {}
        self.last_step: int | None = None
        self.begun: int | None = None
        self.restarts: list[int] = []

    def begin(self, step: int) -> Tangents:
        """Z before the step `step`: decayed by gamma, or 0 after a gap (a step that was not tracked)."""
        if self.begun == step:
            return self.z
        if self.last_step != step - 1 or self.gamma == 0.0:
            self.z, self.state = {}, {}
        elif self.gamma != 1.0:
            self.z = {name: self.gamma * t for name, t in self.z.items()}
            self.state = {name: {k: self.gamma * t for k, t in own.items()} for name, own in self.state.items()}
        self.begun = step
        return self.z

    def advance(self, taken: TakenStep, step: int) -> None:
        """Carry Z over the step `step` just taken. Its gradient's change along (Z, lambda) comes from the step
        itself where it computed it (take_step's `curvature_along` or `mixed_gradient`), else is computed here."""
        z = self.begin(step)
        d_grad = taken.gradient_tangent
        if d_grad is None:
            d_grad = gradient_tangents(taken, z, self.hessian)
        self.z = taken.update.tangent(taken.model, z, d_grad, self.state)
        self._restart_nonfinite(taken.runs)
        self.last_step, self.begun = step, None

    def _restart_nonfinite(self, runs: Runs) -> None:
        """Zero the tangents of each run whose Z or state tangents are not all finite (see the class docstring);
        every tangent is [2, *parameter shape], each run's part as Runs.parts reads it."""
        count = runs.count
        if len(self.restarts) != count:
            self.restarts = [0] * count
        tensors = [*self.z.values(), *(t for own in self.state.values() for t in own.values())]
        if not tensors:
            return
        finite = torch.stack([runs.parts(t, lead=1).isfinite().all(-1).all(0) for t in tensors]).all(0)
        if bool(finite.all()):
            return
        for r in (~finite).nonzero().flatten().tolist():
            self.restarts[r] += 1

        def restarted(t: Tensor) -> Tensor:
            zero = torch.zeros((), dtype=t.dtype, device=t.device)
            return torch.where(finite.view(1, count, 1), runs.parts(t, lead=1), zero).reshape(t.shape)

        self.z = {name: restarted(t) for name, t in self.z.items()}
        self.state = {name: {k: restarted(t) for k, t in own.items()} for name, own in self.state.items()}

    def step_options(self, step: int) -> dict:
        """What take_step should compute through its graph for this tracker: H Z + B ("exact") or B."""
        if self.hessian == "identity":
            return {"mixed_gradient": True}
        return {"curvature_along": self.begin(step)}

    def hypergradient(self, runs: Runs, v: dict[str, Tensor]) -> Tensor:
        """grad L_val^T Z per run: [R, 2]."""
        return runs.per_run_sum({name: v[name] * z for name, z in self.z.items() if name in v}, lead=1).T

    def state_dict(self) -> dict:
        return {"z": self.z, "state": self.state, "last_step": self.last_step, "restarts": self.restarts}

    def load_state_dict(self, state: dict) -> None:
        self.z, self.state, self.last_step = state["z"], state["state"], state["last_step"]
        self.restarts = list(state.get("restarts", []))


def unrolled_hypergradient(model: nn.Module, xs: list[Tensor], ys: list[Tensor], teacher_logits: list[Tensor],
                           x_val: Tensor, y_val: Tensor, lam: Metaparameters, lr: float, t_val: float = 1.0,
                           hessian: str = "exact", momentum: float = 0.0, weight_decay: float = 0.0,
                           nesterov: bool = False, t2_scaling: bool = False) -> Tensor:
    """[dL_val(w_K)/dlambda1, dL_val(w_K)/dT] after K = len(xs) SGD steps of size `lr` (with `momentum`,
    `weight_decay`, `nesterov` as torch.optim.SGD takes them) from the model's current weights, lambda
    held fixed, batch k being (xs[k], ys[k], teacher_logits[k]).

    Computed forward: Z = dw/dlambda is carried over each step (`OnlineTangent` with gamma = 1), so the
    memory is that of one step whatever K; not by backpropagating through the K steps. hessian="exact"
    is the exact derivative; "identity" drops the curvature term H Z of every step (cheaper, biased).
    K = 1 is `greedy_hypergradient`. The model is left exactly as it was (a copy takes the steps); all
    forward passes use its current train/eval mode. Returns a detached tensor.
    """
    if not (len(xs) == len(ys) == len(teacher_logits) >= 1):
        raise ValueError("xs, ys and teacher_logits must be lists of the same length K >= 1")
    runs = Runs()
    shadow = copy.deepcopy(model)
    optimizer = torch.optim.SGD([p for p in shadow.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                                weight_decay=weight_decay, nesterov=nesterov)
    tangent = OnlineTangent(1.0, hessian)
    for step, (x, y, teacher) in enumerate(zip(xs, ys, teacher_logits)):
        _, taken = take_step(shadow, optimizer, runs, x, y, teacher, [lam], t2_scaling, keep=True,
                             **tangent.step_options(step))
        assert taken is not None
        tangent.advance(taken, step)
    v, _ = validation_gradient(shadow, runs, x_val, y_val, t_val)
    return tangent.hypergradient(runs, v)[0].detach()

