"""Where the time of a batched (stacked) step goes, for the Fashion-MNIST student.

Three measurements in one run, on random Fashion-MNIST-shaped data (batch 128, plain steps: no
distillation, no hypergradient), with the allocator setting the CLI applies:

1. per-run milliseconds of a real `fit_batched` step for R = 1, 2, 3, 5, 10 stacked runs (`--sizes`),
   timed round-robin over `--rounds` rounds, medians; what stacking saves is the fixed cost of a step,
   what it cannot save is the per-run cost of the kernels;
2. per-operator CPU time of one step at R = 1 and at the largest R (torch.profiler, self time,
   averaged over `--steps` steps) and the ratio of the two: an operator whose ratio is near R gains
   nothing from stacking;
3. the arithmetic floor: floating-point operations of one run's step (torch.utils.flop_counter) over
   the rate of a large matrix product on the same machine;
4. threads against processes: the largest R trained by one process using all N threads, against N
   processes of one thread each training R runs side by side (the throughput of
   `--executor ray --set threads=1` against the default).

Run: python bench/stacking.py [--sizes 1,2,3,5,10] [--rounds K] [--steps S] [--threads T]
(about 3 minutes on an idle 2-core CPU with the defaults)
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections import defaultdict

import torch
from throughput import BATCH, random_problem
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from metadistill.config import build_config
from metadistill.engine import fit_batched
from metadistill.models import fashion_student
from metadistill.report import cpu_model
from metadistill.runtime import keep_freed_memory


def per_run_step_ms(problem, train_config, strategy, runs: int, steps: int) -> float:
    started = time.perf_counter()
    fit_batched(problem, [strategy() for _ in range(runs)], train_config, list(range(runs)))
    return (time.perf_counter() - started) / steps / runs * 1000


def operator_ms(problem, train_config, strategy, runs: int, steps: int) -> dict[str, float]:
    """Self CPU milliseconds per step of each aten operator in a `fit_batched` loop of R runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fit_batched(problem, [strategy() for _ in range(runs)], train_config, list(range(runs)))
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            totals[event.key] += event.self_cpu_time_total / 1000 / steps
    return totals


def step_flops() -> int:
    """Floating-point operations of one plain training step of one run (forward and backward)."""
    model = fashion_student()
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def timed_loop(threads: int, runs: int, steps: int, rounds: int) -> float:
    """Median ms per R-run step of `rounds` timed fit_batched loops, in a process using `threads` threads."""
    keep_freed_memory()
    torch.set_num_threads(threads)
    config = build_config("fashion-mnist", ["epochs=1", f"eval_every={10**9}"])
    problem = random_problem(steps)

    def strategy():
        return config.strategy("no_distillation")

    per_run_step_ms(problem, config.train_config(), strategy, runs, steps)  # warm-up
    return statistics.median(per_run_step_ms(problem, config.train_config(), strategy, runs, steps) * runs
                             for _ in range(rounds))


def threads_against_processes(threads: int, runs: int, steps: int, rounds: int) -> None:
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as pool:
        alone = pool.apply(timed_loop, (threads, runs, steps, rounds))
    with spawn.Pool(threads) as pool:
        side_by_side = pool.starmap(timed_loop, [(1, runs, steps, rounds)] * threads)
    slowest = max(side_by_side)
    print(f"\n{runs} runs: one process with {threads} threads {alone:.0f} ms per step; {threads} processes with 1 "
          f"thread each, side by side, {', '.join(f'{t:.0f}' for t in side_by_side)} ms per step each")
    ratio = threads * alone / slowest
    print(f"throughput of {threads} one-thread processes / one {threads}-thread process = {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,2,3,5,10", help="numbers of stacked runs to time")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per size (median reported)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed loop")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(size) for size in args.sizes.split(",")]
    config = build_config("fashion-mnist", ["epochs=1", f"eval_every={10**9}"])
    train_config = config.train_config()
    problem = random_problem(args.steps)

    def strategy():
        return config.strategy("no_distillation")

    for runs in sizes:  # warm-up
        per_run_step_ms(problem, train_config, strategy, runs, args.steps)
    times: dict[int, list[float]] = {runs: [] for runs in sizes}
    for _ in range(args.rounds):
        for runs in sizes:
            times[runs].append(per_run_step_ms(problem, train_config, strategy, runs, args.steps))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}; plain fit_batched steps, "
          f"batch {BATCH}, {args.steps} steps per loop, medians of {args.rounds} rounds")
    print(f"{'runs':>4} {'ms/step':>8} {'ms/step/run':>12} {'vs one run':>11}")
    one = statistics.median(times[sizes[0]])
    for runs in sizes:
        median = statistics.median(times[runs])
        print(f"{runs:>4} {median * runs:8.1f} {median:12.2f} {one / median:10.2f}x")

    small, large = sizes[0], sizes[-1]
    ops_small = operator_ms(problem, train_config, strategy, small, args.steps)
    ops_large = operator_ms(problem, train_config, strategy, large, args.steps)
    print(f"\nself CPU ms per step by operator (profiled; top 10 at R={large}), and the ratio R={large} / R={small}")
    print(f"{'operator':<44} {f'R={small}':>8} {f'R={large}':>8} {'ratio':>7}")
    top = sorted(ops_large, key=ops_large.get, reverse=True)[:10]
    for name in top:
        ratio = ops_large[name] / ops_small[name] if ops_small.get(name) else float("nan")
        print(f"{name:<44} {ops_small.get(name, 0.0):8.2f} {ops_large[name]:8.2f} {ratio:7.1f}")
    rest_small = sum(v for k, v in ops_small.items() if k not in top)
    rest_large = sum(v for k, v in ops_large.items() if k not in top)
    print(f"{'all other aten operators':<44} {rest_small:8.2f} {rest_large:8.2f} {rest_large / rest_small:7.1f}")

    flops, rate = step_flops(), matmul_gflops()
    print(f"\none run's step: {flops / 1e6:.0f} MFLOP; a 1024x1024 matrix product runs at {rate:.0f} GFLOP/s here, "
          f"so the arithmetic floor is {flops / rate / 1e6:.2f} ms per run and step")
    if torch.get_num_threads() > 1:
        threads_against_processes(torch.get_num_threads(), large, args.steps, args.rounds)


if __name__ == "__main__":
    main()
