"""Per-step CPU cost of distillation with and without the greedy hypergradient, side by side.

Variants (all on the paper's Fashion-MNIST student, BatchNorm in train mode, random data, SGD lr 0.1,
lambda1 = 0.5, T = 2):

- plain               one distillation step, nothing kept for a hypergradient;
- jvp, fd, double     one step in the loop's shared ordering (the real step doubles as the virtual
                      step), then its hypergradient by that method;
- original            the original code's procedure: a separate virtual step at detached copies of
                      the weights, the validation gradient at w', the finite-difference mixed
                      derivative at w, and then the real step;
- pytorch_double      what a user would write with plain PyTorch: the virtual step by
                      autograd.grad(create_graph=True) through functional_call, the validation loss at
                      w', its derivative in lambda by double backward; then the real step (the same
                      hypergradient; TorchOpt, higher and Betty do the same work);
- online_exact        one step of the long-horizon (online) hypergradient: the real step carries
                      Z = dw/dlambda through H Z + B (double backward through the step's own graph),
                      then v at w' and h = v^T Z;
- online_identity     the same with B alone (hessian "identity": no curvature term);
- proposed_m10_P10    LinearTrajectory(window=10, period=10) driven over blocks of 100 consecutive
                      steps exactly as `fit()` drives a strategy (hypergradients by "jvp"); its time
                      is block time / 100, i.e. the amortised per-step cost.

The machine is assumed shared and noisy: every variant is warmed up, then the variants are timed
round-robin (each round times every variant over a few consecutive steps, or one whole block for
the proposed method), and the median per-step time over rounds is reported.

Run: python bench/hypergrad_cost.py [--steps N] [--repeats K] [--warmup W] [--budget S] [--seed S]
(about 1.5 min on an idle 2-core CPU; `--budget` caps it on a busy one)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from metadistill.hypergrad import OnlineTangent, greedy
from metadistill.losses import distillation_loss
from metadistill.meta import Metaparameters
from metadistill.models import count_parameters, fashion_student
from metadistill.report import cpu_model
from metadistill.runtime import keep_freed_memory
from metadistill.steps import Runs, TakenStep, take_step, validation_gradient
from metadistill.strategies import LinearTrajectory
from metadistill.train import TrainConfig, build_optimizer

BATCH = 128
VAL_BATCH = 128
CLASSES = 10
LR = 0.1
LAM = Metaparameters(lambda1=0.5, temperature=2.0)
T_VAL = 1.0
WINDOW, PERIOD = 10, 10
BLOCK = WINDOW * PERIOD  # one full gradient-window + prediction-windows cycle
PROPOSED = f"proposed_m{WINDOW}_P{PERIOD}"
RATIO_NAMES = ("jvp", "fd", "double", "original", "pytorch_double", "online_exact", "online_identity", PROPOSED)
DEVICE = torch.device("cpu")


@dataclass(frozen=True)
class Data:
    """One random train batch and one random validation batch, shared by all variants."""

    x: Tensor
    y: Tensor
    teacher: Tensor
    x_val: Tensor
    y_val: Tensor

    @classmethod
    def random(cls, seed: int) -> Data:
        g = torch.Generator().manual_seed(seed)
        return cls(
            x=torch.randn(BATCH, 1, 28, 28, generator=g).to(DEVICE),
            y=torch.randint(0, CLASSES, (BATCH,), generator=g).to(DEVICE),
            teacher=torch.randn(BATCH, CLASSES, generator=g).to(DEVICE),
            x_val=torch.randn(VAL_BATCH, 1, 28, 28, generator=g).to(DEVICE),
            y_val=torch.randint(0, CLASSES, (VAL_BATCH,), generator=g).to(DEVICE),
        )


@dataclass
class Variant:
    """A named way of taking one training step; `steps_per_round` consecutive calls are timed together."""

    name: str
    step: Callable[[], object]
    steps_per_round: int


class Student:
    """One model and its optimizer (each variant has its own, so that they do not interfere)."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)  # every variant starts from the same weights
        self.model = fashion_student().to(DEVICE)
        self.model.train()
        self.optimizer = build_optimizer(self.model, TrainConfig(lr=LR, optimizer="sgd"))

    def step(self, data: Data, lam: Metaparameters, keep: bool, **options: object) -> TakenStep | None:
        losses, taken = take_step(self.model, self.optimizer, Runs(), data.x, data.y, data.teacher, [lam], keep=keep,
                                  **options)
        if not math.isfinite(float(losses[0])):
            raise RuntimeError(f"training diverged (loss {float(losses[0])}); the timings would be meaningless")
        return taken

    def hypergradient(self, taken: TakenStep | None, data: Data, method: str = "jvp") -> Tensor:
        assert taken is not None
        v, _ = validation_gradient(self.model, Runs(), data.x_val, data.y_val, T_VAL)
        return greedy(taken, v, method)[0]


def plain_variant(data: Data, seed: int, steps: int) -> Variant:
    student = Student(seed)
    return Variant("plain", lambda: student.step(data, LAM, keep=False), steps)


def shared_ordering_variant(method: str, data: Data, seed: int, steps: int) -> Variant:
    student = Student(seed)

    def step() -> None:
        student.hypergradient(student.step(data, LAM, keep=True), data, method)

    return Variant(method, step, steps)


def online_variant(hessian: str, data: Data, seed: int, steps: int) -> Variant:
    """The engine's online step: Z carried over the real step (gamma 0.99), v at w', h = v^T Z."""
    student = Student(seed)
    tangent = OnlineTangent(0.99, hessian)
    counter = 0

    def step() -> None:
        nonlocal counter
        taken = student.step(data, LAM, keep=True, **tangent.step_options(counter))
        assert taken is not None
        tangent.advance(taken, counter)
        v, _ = validation_gradient(student.model, Runs(), data.x_val, data.y_val, T_VAL)
        tangent.hypergradient(Runs(), v)
        counter += 1

    return Variant(f"online_{hessian}", step, steps)


def pytorch_double_variant(data: Data, seed: int, steps: int) -> Variant:
    """The greedy hypergradient as plain PyTorch writes it (double backward), then the real step."""
    student = Student(seed)
    model = student.model

    def step() -> None:
        lam = torch.tensor(LAM.as_tuple(), device=DEVICE, requires_grad=True)
        params = {name: p.detach().requires_grad_() for name, p in model.named_parameters()}
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        loss = distillation_loss(functional_call(model, (params, buffers), (data.x,)), data.teacher, data.y,
                                 lam[0], lam[1])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        moved = {name: p - LR * g for (name, p), g in zip(params.items(), grads)}
        val = F.cross_entropy(functional_call(model, (moved, buffers), (data.x_val,)) / T_VAL, data.y_val)
        torch.autograd.grad(val, lam)
        student.step(data, LAM, keep=False)

    return Variant("pytorch_double", step, steps)


def original_variant(data: Data, seed: int, steps: int) -> Variant:
    """Separate virtual step, v at w', finite-difference mixed product at w, then the real step."""
    student = Student(seed)
    model = student.model

    def step() -> None:
        params = {name: p.detach().clone() for name, p in model.named_parameters()}
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
        scratch = {name: b.clone() for name, b in buffers.items()}  # BatchNorm writes running stats here
        logits = functional_call(model, (leaves, scratch), (data.x,))
        loss = distillation_loss(logits, data.teacher, data.y, LAM.lambda1, LAM.temperature)
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        moved = {name: params[name] - LR * grads[name] for name in params}
        v, _ = validation_gradient(model, Runs(), data.x_val, data.y_val, T_VAL, params=moved)
        virtual = TakenStep(model, Runs(), params, buffers, data.x, data.y, data.teacher, LAM.lambda1,
                            LAM.temperature, False, logits, None, None, None)  # type: ignore[arg-type]
        virtual.mixed_product({name: LR * g for name, g in v.items()}, "fd")
        student.step(data, LAM, keep=False)

    return Variant("original", step, steps)


def proposed_variant(data: Data, seed: int) -> Variant:
    """One call is one step of the `fit()` loop driving LinearTrajectory; timed in whole cycles."""
    student = Student(seed)
    strategy = LinearTrajectory(window=WINDOW, period=PERIOD, lambda1=LAM.lambda1, temperature=LAM.temperature)
    lam = strategy.start(seed)
    counter = 0

    def refuse() -> Tensor:
        raise RuntimeError("the strategy asked for a hypergradient it said it would not want")

    def step() -> None:
        nonlocal lam, counter
        wants = strategy.wants_hypergradient(counter)
        taken = student.step(data, lam, keep=wants)

        def hypergradient() -> Tensor:
            return student.hypergradient(taken, data)

        lam = strategy.advance(counter, hypergradient if wants else refuse)
        counter += 1

    return Variant(PROPOSED, step, BLOCK)


def per_step_seconds(step: Callable[[], object], count: int) -> float:
    """Wall time of `count` consecutive calls of `step`, divided by `count` (a GPU is synchronised)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    started = time.perf_counter()
    for _ in range(count):
        step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return (time.perf_counter() - started) / count


def benchmark(variants: list[Variant], warmup: int, repeats: int, budget_s: float) -> dict[str, list[float]]:
    """`warmup` untimed rounds, then up to `repeats` timed round-robin rounds; per-step seconds by name.

    Warming up in whole rounds keeps the proposed method's timed blocks aligned with its cycles. No
    round starts once `budget_s` seconds have passed (0: no limit), but at least one is always timed.
    """
    started = time.perf_counter()
    samples: dict[str, list[float]] = {variant.name: [] for variant in variants}
    for round_index in range(warmup + repeats):
        timed = round_index >= warmup
        if timed and round_index > warmup and 0 < budget_s < time.perf_counter() - started:
            print(f"time budget of {budget_s:g} s spent: stopped after {round_index - warmup} timed rounds")
            break
        for variant in variants:
            seconds = per_step_seconds(variant.step, variant.steps_per_round)
            if timed:
                samples[variant.name].append(seconds)
    return samples


def report(samples: dict[str, list[float]]) -> None:
    """The table of medians (with quartiles, minimum and the median of same-round ratios), the ratio
    lines and the acceptance checks."""
    medians = {name: statistics.median(times) for name, times in samples.items()}
    plain = samples["plain"]
    print(f"\n{'variant':<18} {'median ms/step':>14} {'q1':>8} {'q3':>8} {'min':>8} {'paired':>7} {'rounds':>7}")
    for name, times in samples.items():
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
        paired = statistics.median(t / p for t, p in zip(times, plain))
        print(f"{name:<18} {1e3 * medians[name]:>14.2f} {1e3 * q1:>8.2f} {1e3 * q3:>8.2f} "
              f"{1e3 * min(times):>8.2f} {paired:>7.2f} {len(times):>7d}")
    print("(paired: median over rounds of the time over plain's time in the same round)")
    print()
    ratios = {name: medians[name] / medians["plain"] for name in RATIO_NAMES}
    for name, ratio in ratios.items():
        print(f"ratio {name}/plain = {ratio:.2f}")
    print()
    checks = [
        ("jvp/plain <= 2.6", ratios["jvp"] <= 2.6),
        ("jvp lower than fd, double, original and pytorch_double",
         all(medians["jvp"] < medians[name] for name in ("fd", "double", "original", "pytorch_double"))),
        (f"{PROPOSED}/plain <= 1.3", ratios[PROPOSED] <= 1.3),
        ("online_exact/plain <= 7", ratios["online_exact"] <= 7),
        ("online_identity/plain <= 3.5", ratios["online_identity"] <= 3.5),
    ]
    for label, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {label}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5,
                        help="consecutive steps timed per round for every variant but the proposed one, "
                             f"which is always timed over one {BLOCK}-step block (default 5)")
    parser.add_argument("--repeats", type=int, default=30, help="number of timed round-robin rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds before them (default 1)")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="start no timed round after this many seconds; 0: no limit (default 150)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the initial weights")
    parser.add_argument("--device", default="cpu", help="torch device to time on (cpu, cuda)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc settings alone (the CLI tunes them: runtime.keep_freed_memory)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    tuned = False if args.default_malloc else keep_freed_memory()
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.budget < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup and --budget >= 0")

    data = Data.random(args.seed)
    variants = [
        plain_variant(data, args.seed, args.steps),
        *(shared_ordering_variant(method, data, args.seed, args.steps) for method in ("jvp", "fd", "double")),
        original_variant(data, args.seed, args.steps),
        pytorch_double_variant(data, args.seed, args.steps),
        *(online_variant(hessian, data, args.seed, args.steps) for hessian in ("exact", "identity")),
        proposed_variant(data, args.seed),
    ]

    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"CPU: {cpu_model()}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}, malloc tuned: {tuned}")
    print(f"fashion_student: {count_parameters(fashion_student())} parameters; batch {BATCH}, "
          f"validation batch {VAL_BATCH}, SGD lr {LR}, lambda1 {LAM.lambda1}, T {LAM.temperature}")
    print(f"{args.repeats} rounds of {args.steps} steps per variant ({BLOCK}-step blocks for the proposed "
          f"method), after {args.warmup} warm-up round(s); "
          f"time budget {args.budget:g} s")
    started = time.perf_counter()
    samples = benchmark(variants, args.warmup, args.repeats, args.budget)
    print(f"timed in {time.perf_counter() - started:.1f} s")
    report(samples)


if __name__ == "__main__":
    main()
