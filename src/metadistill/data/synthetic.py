"""The paper's synthetic task: y = 1[x1*x2 + 0.5*eps > 0], a teacher and a student that see different features."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..models import logistic_regression
from ..problem import Problem

TEACHER_FEATURES = [0, 1, 2]  # x1, x2, 1[x1 > 0 and x2 > 0]
STUDENT_FEATURES = [0, 1, 3]  # x1, x2, sign(x1 * x2): the same for every method
SPLITS = {"teacher": 200, "train": 15, "val": 15, "test": 200}


def sample(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n points: features [x1, x2, 1[x1>0 and x2>0], sign(x1 x2)] and labels 1[x1 x2 + 0.5 eps > 0]."""
    x1, x2, eps = torch.randn(3, n, generator=generator, dtype=torch.float64)
    y = (x1 * x2 + 0.5 * eps > 0).long()
    features = torch.stack([x1, x2, ((x1 > 0) & (x2 > 0)).double(), torch.sign(x1 * x2)], dim=1)
    return features.float(), y


@functools.lru_cache(maxsize=4)
def synthetic_problem(
    data_seed: int = 0, teacher_steps: int = 20000, teacher_lr: float = 0.01
) -> tuple[Problem, float]:
    """(Problem, teacher test accuracy). The data and the teacher depend on `data_seed` only.

    The teacher is logistic regression on TEACHER_FEATURES trained by full-batch gradient descent
    on its own 200 points; the student sees STUDENT_FEATURES of 15 train, 15 validation and 200
    test points. The test points never take part in training or in any choice.
    """
    generator = torch.Generator().manual_seed(data_seed)
    parts = {name: sample(n, generator) for name, n in SPLITS.items()}
    x_teacher, y_teacher = parts["teacher"]
    torch.manual_seed(data_seed)
    teacher = logistic_regression(len(TEACHER_FEATURES), 2)
    weight, bias = teacher[0].weight, teacher[0].bias
    with torch.no_grad():
        _descend(x_teacher[:, TEACHER_FEATURES], y_teacher, weight, bias, teacher_steps, teacher_lr)
        teacher_train = teacher(parts["train"][0][:, TEACHER_FEATURES])
        x_test, y_test = parts["test"]
        teacher_acc = float((teacher(x_test[:, TEACHER_FEATURES]).argmax(1) == y_test).float().mean())
    problem = Problem(
        x_train=parts["train"][0][:, STUDENT_FEATURES], y_train=parts["train"][1], teacher_train=teacher_train,
        x_val=parts["val"][0][:, STUDENT_FEATURES], y_val=parts["val"][1],
        x_test=x_test[:, STUDENT_FEATURES], y_test=y_test,
        make_student=lambda: logistic_regression(len(STUDENT_FEATURES), 2),
    )
    return problem, teacher_acc


def _descend(inputs: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, steps: int,
             lr: float) -> None:
    """`steps` of full-batch gradient descent on the mean cross-entropy of the linear model (weight, bias),
    in place: the same arithmetic as backward() and torch.optim.SGD, to the bit, at a quarter of the time.

    The gradient is what autograd computes, kernel for kernel: cross-entropy's backward gives -1/n at each
    target (nll_loss), then log_softmax's backward kernel, then linear's (grad_z^T x, and the column sums).
    """
    grad_log_p = torch.zeros(len(targets), weight.shape[0], dtype=weight.dtype)
    grad_log_p[torch.arange(len(targets)), targets] = -1.0 / len(targets)
    for _ in range(steps):
        log_p = F.log_softmax(F.linear(inputs, weight, bias), dim=1)
        grad_z = torch.ops.aten._log_softmax_backward_data(grad_log_p, log_p, 1, weight.dtype)
        torch._foreach_add_([weight, bias], [grad_z.t().mm(inputs), grad_z.sum(0)], alpha=-lr)
