"""How well each predictor of the proposed method extrapolates recorded gradient-method trajectories.

For every recorded run of the `gradient` method given (its history.jsonl: lambda1 and T at every step),
the trajectory is cut into cycles of period * window steps as the proposed method would: the first
`window` hypergradient updates of a cycle are what the predictor sees (recorded at z = 0..m-1, as
`strategies.LinearTrajectory` records them), and the gradient method's own values in the rest of the
cycle (z = m .. P*m - 1) are what it should have predicted. The predictors are the library's own
(`strategies.fit_predictor` / `predict`), fitted in the "sgd" meta-optimizer's coordinates (lambda1, T)
or, with --coordinates unconstrained, in (logit lambda1, log T).

Printed per predictor: the median and the mean over cycles (all runs pooled) of the mean absolute error over
the prediction windows, for lambda1 and for log10 T, and the fractions of cycles in which it predicts better
and worse than holding the last value (ties, e.g. lambda1 resting at a bound, are neither); and the R^2 of the
paper's line over each gradient window (median), for lambda1 and log10 T.

Run: python studies/predictors.py RUN_DIR [RUN_DIR ...] [--window 10] [--period 2]
(RUN_DIR: a records directory such as runs/fashion-mnist/gradient, or single run_NNN directories)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np

from metadistill.meta import Metaparameters
from metadistill.strategies import LONG_WINDOWS, PREDICTORS, fit_predictor, predict


def trajectories(paths: list[Path]) -> list[tuple[str, np.ndarray]]:
    """(run directory, [steps, 2] array of lambda1, T) for every run under the given directories."""
    found = []
    for path in paths:
        for history in sorted(Path(path).glob("**/history.jsonl")):
            rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
            found.append((str(history.parent), np.array([[r["lambda1"], r["temperature"]] for r in rows])))
    return found


def to_coordinates(values: np.ndarray, unconstrained: bool) -> np.ndarray:
    if not unconstrained:
        return values
    return np.array([Metaparameters.clamped(*v).to_unconstrained() for v in values])


def from_coordinates(value: tuple[float, float], unconstrained: bool) -> tuple[float, float]:
    lam = Metaparameters.from_unconstrained(*value) if unconstrained else Metaparameters.clamped(*value)
    return lam.as_tuple()


def r_squared(z: np.ndarray, values: np.ndarray) -> float:
    slope, intercept = np.polyfit(z, values, 1)
    residual = values - (slope * z + intercept)
    total = values - values.mean()
    return float("nan") if float(total @ total) == 0 else 1.0 - float(residual @ residual) / float(total @ total)


def errors(trajectory: np.ndarray, window: int, period: int, unconstrained: bool) -> dict[str, list]:
    """Per predictor: a list of (mean |error| of lambda1, mean |error| of log10 T) per cycle; and R^2 per window."""
    cycle = window * period
    out: dict[str, list] = {kind: [] for kind in PREDICTORS}
    out["r2"] = []
    coordinates = to_coordinates(trajectory, unconstrained)
    history: list[list[tuple[float, float]]] = []
    for start in range(0, len(trajectory) - cycle, cycle):
        # recorded z = i is the value after the update at step start + i, i.e. the value used at start + i + 1
        recorded = [tuple(v) for v in coordinates[start + 1:start + window + 1]]
        history = [*history, recorded][-LONG_WINDOWS:]
        z = np.arange(window, dtype=np.float64)
        out["r2"].append((r_squared(z, trajectory[start + 1:start + window + 1, 0]),
                          r_squared(z, np.log10(trajectory[start + 1:start + window + 1, 1]))))
        targets = range(window, cycle)
        actual = trajectory[[start + k for k in targets]]
        for kind in PREDICTORS:
            fitted = fit_predictor(kind, history, window, period)
            predicted = np.array([from_coordinates(predict(kind, fitted, k, window), unconstrained) for k in targets])
            out[kind].append((float(np.abs(predicted[:, 0] - actual[:, 0]).mean()),
                              float(np.abs(np.log10(predicted[:, 1]) - np.log10(actual[:, 1])).mean())))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="directories holding gradient runs' history.jsonl")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--period", type=int, default=2)
    parser.add_argument("--coordinates", choices=("raw", "unconstrained"), default="raw")
    args = parser.parse_args(argv)
    runs = trajectories(args.runs)
    if not runs:
        parser.error("no history.jsonl found")
    pooled: dict[str, list] = {}
    for _, trajectory in runs:
        for key, values in errors(trajectory, args.window, args.period, args.coordinates == "unconstrained").items():
            pooled.setdefault(key, []).extend(values)
    cycles = len(pooled["hold"])
    print(f"{len(runs)} runs, {cycles} cycles of {args.window * args.period} steps (window {args.window}, period "
          f"{args.period}), predictions in {args.coordinates} coordinates")
    print(f"{'predictor':<10} {'lambda1 MAE':>12} {'(mean)':>9} {'log10 T MAE':>12} {'(mean)':>9} "
          f"{'vs hold, lambda1: better/worse':>31} {'log10 T: better/worse':>22}")
    hold = pooled["hold"]
    for kind in PREDICTORS:
        values = pooled[kind]
        better = [sum(a[i] < b[i] for a, b in zip(values, hold)) / cycles for i in (0, 1)]
        worse = [sum(a[i] > b[i] for a, b in zip(values, hold)) / cycles for i in (0, 1)]
        print(f"{kind:<10} {statistics.median(v[0] for v in values):>12.2e} "
              f"{statistics.mean(v[0] for v in values):>9.2e} {statistics.median(v[1] for v in values):>12.2e} "
              f"{statistics.mean(v[1] for v in values):>9.2e} {better[0]:>23.2f}/{worse[0]:.2f} "
              f"{better[1]:>17.2f}/{worse[1]:.2f}")
    print("(MAE: median over cycles of the mean absolute error over a cycle's prediction windows; better/worse: "
          "the fraction of cycles with a smaller/larger error than holding the last value, the rest ties)")
    r2 = [[v[i] for v in pooled["r2"] if not math.isnan(v[i])] for i in (0, 1)]
    print(f"window R^2 of the paper's line: lambda1 median {statistics.median(r2[0]):.2f}, "
          f"log10 T median {statistics.median(r2[1]):.2f}")


if __name__ == "__main__":
    main()
