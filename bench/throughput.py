"""Per-epoch seconds of one run against R runs trained batched, for the Fashion-MNIST student.

Variants, each a real training loop on random Fashion-MNIST-shaped data (batch 128, SGD lr 1.0, the
paper's settings), `--steps` steps long, timed whole and scaled to one epoch of the paper's 54000
training images (422 steps):

- R=1                one run (`engine.fit`: the student as it is);
- R=1 NCHW           the same with `channels_last=False` (the student's weights in PyTorch's default
                     memory order, as before channels-last became the default);
- R=N                N runs (default 10) as one stacked model (`engine.fit_batched`);

each for "plain" (no distillation: no hypergradient) and "gradient" (a greedy hypergradient after
every step). Variants are timed round-robin over `--rounds` rounds; medians are reported, and
`speedup batched10 = 10 x time(R=1) / time(R=10)` and `speedup channels_last = time(R=1 NCHW) / time(R=1)`
for both kinds of step. (Before the engine was
one loop, a separate batched loop also ran R=1; fit and fit_batched are now the same loop.)

Run: python bench/throughput.py [--rounds K] [--steps S] [--runs N] [--threads T] [--device D]
(about 4 minutes on an idle 2-core CPU with the defaults)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import torch

from metadistill.config import build_config
from metadistill.engine import fit, fit_batched
from metadistill.models import fashion_student
from metadistill.problem import Problem
from metadistill.report import cpu_model
from metadistill.runtime import keep_freed_memory

TRAIN_IMAGES = 54000
BATCH = 128


def random_problem(steps: int, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    n = steps * BATCH

    def images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(count, 1, 28, 28, generator=g), torch.randint(0, 10, (count,), generator=g)

    (xt, yt), (xv, yv), (xs, ys) = images(n), images(2 * BATCH), images(BATCH)
    return Problem(xt, yt, 3 * torch.randn(n, 10, generator=g), xv, yv, xs, ys, fashion_student)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (median reported)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed run")
    parser.add_argument("--runs", type=int, default=10, help="runs in the batched variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc settings alone (the CLI tunes them: runtime.keep_freed_memory)")
    args = parser.parse_args()
    tuned = False if args.default_malloc else keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = build_config("fashion-mnist", ["epochs=1", f"eval_every={10**9}", f"device={args.device}"])
    train_config = config.train_config()
    nchw_config = dataclasses.replace(train_config, channels_last=False)
    problem = random_problem(args.steps)
    epoch_steps = math.ceil(TRAIN_IMAGES / BATCH)
    seeds = list(range(args.runs))

    def variants(method: str) -> dict[str, callable]:
        return {
            "R=1": lambda: fit(problem, config.strategy(method), train_config, 0),
            "R=1 NCHW": lambda: fit(problem, config.strategy(method), nchw_config, 0),
            f"R={args.runs}": lambda: fit_batched(problem, [config.strategy(method) for _ in seeds], train_config,
                                                  seeds),
        }

    kinds = {"plain": variants("no_distillation"), "gradient": variants("gradient")}
    times: dict[tuple[str, str], list[float]] = {(k, v): [] for k, vs in kinds.items() for v in vs}
    for kind in kinds.values():  # warm-up
        for run in kind.values():
            run()
    for _ in range(args.rounds):
        for kind, runs in kinds.items():
            for name, run in runs.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                started = time.perf_counter()
                run()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[(kind, name)].append((time.perf_counter() - started) / args.steps * epoch_steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}, malloc tuned: {tuned}; "
          f"{args.steps} steps per timed run, {args.rounds} rounds, medians scaled to one epoch ({epoch_steps} steps)")
    print(f"{'step':<9} {'variant':<14} {'s/epoch':>8} {'s/epoch/run':>12}")
    for (kind, name), values in times.items():
        runs = args.runs if name.endswith(f"R={args.runs}") else 1
        median = statistics.median(values)
        print(f"{kind:<9} {name:<14} {median:8.2f} {median / runs:12.2f}")
    for kind in kinds:
        one = statistics.median(times[(kind, "R=1")])
        many = statistics.median(times[(kind, f"R={args.runs}")])
        print(f"speedup batched{args.runs} = {args.runs * one / many:.2f} ({kind})")
    for kind in kinds:
        ratio = statistics.median(times[(kind, "R=1 NCHW")]) / statistics.median(times[(kind, "R=1")])
        print(f"speedup channels_last = {ratio:.2f} ({kind}, one run: NCHW time / channels-last time)")


if __name__ == "__main__":
    main()
