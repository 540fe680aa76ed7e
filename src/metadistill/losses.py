"""Distillation and validation losses, and the closed-form mixed derivative of the loss head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Scalar = float | Tensor


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, lambda1: Scalar,
                      temperature: Scalar, t2_scaling: bool = False) -> Tensor:
    """Batch mean of  lambda1 * CE(z, y) + (1 - lambda1) * s(T) * KL(softmax(f/T) || softmax(z/T)).

    z are the student logits, f the teacher logits (constants), y the hard labels. lambda1 weights
    the hard-label cross-entropy, so lambda1 = 1 is training without distillation. s(T) = 1 (the
    paper), or T**2 (Hinton's scaling) when `t2_scaling` is true. `lambda1` and `temperature` may be
    floats or 0-d tensors (tensors that require grad make the loss differentiable in them).

    R runs at once: logits [B, R, K], targets [B, R] and per-run `lambda1`, `temperature` of shape
    [R] give the R batch-mean losses [R]. Where lambda1 is exactly 1 (a float, or a tensor of ones
    that does not require grad) the distillation term is not computed, and `teacher_logits` may be None.
    """
    if isinstance(lambda1, float) and lambda1 == 1.0 or (
            isinstance(lambda1, Tensor) and not lambda1.requires_grad and bool((lambda1 == 1.0).all())):
        return loss_terms(student_logits, teacher_logits, targets, None, t2_scaling)[0]
    hard, soft = loss_terms(student_logits, teacher_logits, targets, temperature, t2_scaling)
    return lambda1 * hard + (1.0 - lambda1) * soft


def loss_terms(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, temperature: Scalar | None,
               t2_scaling: bool = False) -> tuple[Tensor, Tensor | None]:
    """(CE(z, y), s(T) * KL(softmax(f/T) || softmax(z/T))), batch means, of `distillation_loss`; the second is
    None when `temperature` is None. Logits [B, K] give scalars; [B, R, K] with T of shape [R] give [R]."""
    if temperature is not None and teacher_logits is None:
        raise ValueError("the distillation term needs the teacher's logits (only lambda1 = 1 trains without them)")
    if student_logits.dim() == 2:
        hard = F.cross_entropy(student_logits, targets)
        if temperature is None:
            return hard, None
        soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                        F.log_softmax(teacher_logits / temperature, dim=1), reduction="batchmean", log_target=True)
    else:
        log_p = F.log_softmax(student_logits, dim=-1)
        hard = -log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(0)
        if temperature is None:
            return hard, None
        t = temperature.unsqueeze(-1)
        log_q = F.log_softmax(student_logits / t, dim=-1)
        log_teacher = F.log_softmax(teacher_logits / t, dim=-1)
        soft = (log_teacher.exp() * (log_teacher - log_q)).sum(-1).mean(0)
    if t2_scaling:
        soft = soft * temperature**2
    return hard, soft


def validation_loss(student_logits: Tensor, targets: Tensor, t_val: float = 1.0) -> Tensor:
    """Batch mean of CE(z / t_val, y); it does not depend on the metaparameters. R runs at once: logits
    [B, R, K] and targets [B, R] give the R batch means [R]."""
    if student_logits.dim() == 3:
        log_p = F.log_softmax(student_logits / t_val, dim=-1)
        return -log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(0)
    return F.cross_entropy(student_logits / t_val, targets)


def mixed_derivative(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, lambda1: Scalar,
                     temperature: Scalar, t2_scaling: bool = False) -> Tensor:
    """d^2 L / (d lambda dz) of the batch-mean `distillation_loss`, shape [2, B, K].

    Also for stacked runs: logits [B, R, K], targets [B, R] and per-run `lambda1`, `temperature` of
    shape [R, 1] give run r's derivative, of its own batch-mean loss, in [2, B, R, K][:, :, r].

    Row 0 is the derivative in lambda1, row 1 in T. With sigma = softmax(z), q = softmax(z/T),
    p = softmax(f/T) and c(T) = s(T)/T:
        dl/dz          = lambda1 (sigma - e_y) + (1 - lambda1) c(T) (q - p)
        d2l/dlambda1dz = (sigma - e_y) - c(T) (q - p)
        d2l/dTdz       = (1 - lambda1) [c'(T) (q - p) + c(T) (dq/dT - dp/dT)],
    where dq/dT = -q * (z - <q, z>) / T^2 and likewise for p with f.
    """
    z = student_logits
    batch, classes = z.shape[0], z.shape[-1]
    sigma = torch.softmax(z, dim=-1)
    q = torch.softmax(z / temperature, dim=-1)
    p = torch.softmax(teacher_logits.to(z.dtype) / temperature, dim=-1)
    onehot = F.one_hot(targets, classes).to(z.dtype)
    if t2_scaling:
        c, dc = temperature, 1.0
    else:
        c, dc = 1.0 / temperature, -1.0 / temperature**2
    dq = -q * (z - (q * z).sum(-1, keepdim=True)) / temperature**2
    f = teacher_logits.to(z.dtype)
    dp = -p * (f - (p * f).sum(-1, keepdim=True)) / temperature**2
    d_lambda1 = (sigma - onehot) - c * (q - p)
    d_temperature = (1.0 - lambda1) * (dc * (q - p) + c * (dq - dp))
    return torch.stack((d_lambda1, d_temperature)) / batch
