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
    inputs = x_teacher[:, TEACHER_FEATURES]
    for _ in range(teacher_steps):  # plain SGD, the same arithmetic as torch.optim.SGD at half the overhead
        grads = torch.autograd.grad(F.cross_entropy(F.linear(inputs, weight, bias), y_teacher), (weight, bias))
        with torch.no_grad():
            torch._foreach_add_([weight, bias], list(grads), alpha=-teacher_lr)
    with torch.no_grad():
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
