"""How far the old Adam approximation (second moment held fixed) is from the exact greedy hypergradient.

A real run: the paper's Fashion-MNIST student trained with Adam (lr 1e-3, float64) on Fashion-MNIST
(the official files, found as the CLI finds them; random images of the same shape if there are none),
lambda1 = 0.5, T = 2, batch 128. At steps 1, 5, 50 and 500 the greedy hypergradient of the step is
computed three ways:
- oracle: double backward through Adam's update written out in float64 (its first and second moments
  both functions of the gradient, everything before the step held fixed);
- exact: metadistill's UpdateMap with adam_update="exact" (the default);
- fixed: UpdateMap with adam_update="fixed_second_moment" (the denominator held at its value after the step).
It prints the relative error |h - oracle| / |oracle| of each, per component.

Run: python bench/adam_update_map.py [--steps 1,5,50,500] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metadistill.hypergrad import greedy
from metadistill.meta import Metaparameters
from metadistill.models import fashion_student
from metadistill.report import cpu_model
from metadistill.steps import Runs, take_step, validation_gradient

LAM = Metaparameters(0.5, 2.0)
LR = 1e-3


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(images, labels, teacher logits, source): Fashion-MNIST when its files are found, else random."""
    try:
        from metadistill.data.vision import load_vision

        vision = load_vision("fashion-mnist")
        x, y, source = vision.x_train[:20000].double(), vision.y_train[:20000], "Fashion-MNIST (first 20000 images)"
    except Exception:  # noqa: BLE001 - no data here: the same shapes, random
        g = torch.Generator().manual_seed(seed)
        x, y, source = torch.randn(20000, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(
            0, 10, (20000,), generator=g), "random images (no Fashion-MNIST files found)"
    g = torch.Generator().manual_seed(seed)
    teacher = 3.0 * F.one_hot(y, 10).double() + torch.randn(len(y), 10, generator=g, dtype=torch.float64)
    return x, y, teacher, source


def oracle(model, optimizer, params, buffers, state, x, y, teacher, xv, yv) -> torch.Tensor:
    lam_t = torch.tensor(LAM.as_tuple(), dtype=torch.float64, requires_grad=True)
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    z = functional_call(model, (leaves, {n: b.clone() for n, b in buffers.items()}), (x,))
    soft = F.kl_div(F.log_softmax(z / lam_t[1], 1), F.log_softmax(teacher / lam_t[1], 1), reduction="batchmean",
                    log_target=True)
    loss = lam_t[0] * F.cross_entropy(z, y) + (1 - lam_t[0]) * soft
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    group = optimizer.param_groups[0]
    (beta1, beta2), eps = group["betas"], group["eps"]
    moved = {}
    for (name, w), g in zip(params.items(), grads):
        own = state[name]
        t = float(own.get("step", 0)) + 1
        m = beta1 * own.get("exp_avg", torch.zeros_like(w)) + (1 - beta1) * g
        v = beta2 * own.get("exp_avg_sq", torch.zeros_like(w)) + (1 - beta2) * g * g
        v_hat = v / (1 - beta2**t)
        # sqrt with derivative 0 where v_hat = 0 (there the gradient and its change are 0: the limit of d|g|)
        root = torch.where(v_hat > 0, torch.where(v_hat > 0, v_hat, torch.ones_like(v_hat)).sqrt(), 0.0)
        moved[name] = w - LR * (m / (1 - beta1**t)) / (root + eps)
    zv = functional_call(model, (moved, {n: b.clone() for n, b in buffers.items()}), (xv,))
    return torch.autograd.grad(F.cross_entropy(zv, yv), lam_t)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="1,5,50,500", help="steps (1-based) at which to compare")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    at = sorted(int(s) for s in args.steps.split(","))
    x_all, y_all, teacher_all, source = data(args.seed)
    torch.manual_seed(args.seed)
    model = fashion_student().double()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(args.seed))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_model()}; data: {source}")
    print(f"Adam lr {LR}, batch 128, lambda1 {LAM.lambda1}, T {LAM.temperature}, float64\n")
    print(f"{'step':>5} {'oracle dL/dlambda1':>19} {'oracle dL/dT':>13} {'exact rel err':>22} {'fixed rel err':>22}")
    for step in range(1, at[-1] + 1):
        index = order[(step - 1) * 128 % len(order):][:128]
        x, y, teacher = x_all[index], y_all[index], teacher_all[index]
        if step not in at:
            take_step(model, optimizer, Runs(), x, y, teacher, [LAM])
            continue
        v_index = order[-128:]
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        state = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                 for n, p in model.named_parameters()}
        expected = oracle(model, optimizer, params, buffers, state, x, y, teacher, x_all[v_index], y_all[v_index])
        errors = {}
        for kind in ("exact", "fixed_second_moment"):
            probe = fashion_student().double()
            probe.load_state_dict(model.state_dict())
            probe.train()
            probe_opt = torch.optim.Adam(probe.parameters(), lr=LR)
            probe_opt.load_state_dict(optimizer.state_dict())
            _, taken = take_step(probe, probe_opt, Runs(), x, y, teacher, [LAM], keep=True, adam_update=kind)
            v, _ = validation_gradient(probe, Runs(), x_all[v_index], y_all[v_index])
            errors[kind] = ((greedy(taken, v)[0] - expected).abs() / expected.abs()).tolist()
        take_step(model, optimizer, Runs(), x, y, teacher, [LAM])
        print(f"{step:>5} {float(expected[0]):>19.4e} {float(expected[1]):>13.4e} "
              f"{errors['exact'][0]:>10.1e} {errors['exact'][1]:>10.1e}  "
              f"{errors['fixed_second_moment'][0]:>10.2e} {errors['fixed_second_moment'][1]:>10.2e}")
    print("\n(relative errors: dL/dlambda1 then dL/dT)")


if __name__ == "__main__":
    main()
