"""Figures from recorded runs (never reruns anything): trajectories, accuracy per epoch, accuracy against cost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import GRADIENT_METHODS, METHODS, ONLINE_METHODS, method_order
from .meta import LAMBDA1_BOUNDS, TEMPERATURE_BOUNDS
from .records import CONFIG, finished_runs, load_history

# What one hypergradient costs on top of its step, in plain steps: bench/hypergrad_cost.py on the Fashion-MNIST
# student, idle 2-core CPU (README, "Cost of a step"): a step with the greedy jvp one costs 2.59 plain steps, with
# the online one 3.18 (hessian "identity") and 6.19 ("exact").
HYPERGRADIENT_COST = {"greedy": 1.6, "identity": 2.2, "exact": 5.2}
COLORS = dict(zip(METHODS, ["#7f7f7f", "#bcbd22", "#17becf", "#d62728", "#9467bd", "#1f77b4", "#2ca02c",
                            "#ff7f0e", "#8c564b", "#e377c2"], strict=True))
LABELS = {"no_distillation": "no distillation", "naive": "naive", "random": "random", "gradient": "gradient",
          "hyperopt": "hyperopt", "proposed": "proposed", "online": "online", "proposed_online": "proposed online",
          "optuna": "optuna", "pbt": "pbt"}


def _run_config(run: dict) -> dict:
    """The identity (config.json) of a finished run."""
    return json.loads((Path(run["dir"]) / CONFIG).read_text())


def _hypergradient_cost(run: dict) -> float:
    """The cost of one of the run's hypergradients (by its method and, for online ones, its hessian)."""
    if run["method"] not in ONLINE_METHODS:
        return HYPERGRADIENT_COST["greedy"]
    try:
        hessian = _run_config(run).get("hessian", "exact")
    except (OSError, ValueError, KeyError):
        hessian = "exact"
    return HYPERGRADIENT_COST.get(hessian, HYPERGRADIENT_COST["exact"])


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _in_order(by_method: dict[str, list[dict]]) -> list[str]:
    return sorted(by_method, key=method_order)


def _figure(**kwargs: object):
    """A matplotlib Figure of its own, drawn without pyplot: the user's backend and pyplot's figures are left
    alone, and matplotlib loads only when a figure is drawn."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def _band(ax, x, values, color, label, log=False, bounds=None):
    """Mean +- sd over runs (rows of `values`); on a log axis both are taken of log10 of the values.
    `bounds` (low, high) clips the band to the values' range (an accuracy's or lambda1's sd band must not
    pass 1)."""
    values = np.asarray(values, dtype=float)
    if log:
        logs = np.log10(values)
        mean, low, high = (10 ** (logs.mean(0) + k * logs.std(0)) for k in (0, -1, 1))
    else:
        mean, sd = values.mean(0), values.std(0)
        low, high = mean - sd, mean + sd
    if bounds is not None:
        low, high = np.clip(low, *bounds), np.clip(high, *bounds)
    ax.plot(x, mean, color=color, label=label, linewidth=1.6)
    if len(values) > 1:
        ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)


def trajectories(dataset: str, by_method: dict[str, list[dict]], path: Path) -> Path | None:
    """lambda1 and T against step for the gradient methods and pbt (its winning member's lineage): every run
    (thin), mean +- sd (band); a zoom on run 0's first cycles shows the proposed method's hypergradient steps
    and predicted windows."""
    methods = [m for m in (*GRADIENT_METHODS, "pbt") if m in by_method]
    if not methods:
        return None
    histories = {m: [load_history(Path(r["dir"])) for r in by_method[m]] for m in methods}
    fig = _figure(figsize=(12, 6.5))
    axes = fig.subplots(2, 2, gridspec_kw={"width_ratios": [2, 1]})
    zoom_steps = None
    if "proposed" in methods:
        config = _run_config(by_method["proposed"][0])
        window, period = config["window"], config["period"]
        zoom_steps = min(4 * window * period, len(histories["proposed"][0]))
    rows = (("lambda1", "lambda1 (weight of hard labels)", False, LAMBDA1_BOUNDS),
            ("temperature", "T (log scale)", True, TEMPERATURE_BOUNDS))
    for row, (key, name, log, bounds) in enumerate(rows):
        ax, zoom = axes[row]
        for method in methods:
            runs = histories[method]
            length = min(len(h) for h in runs)
            values = [[step[key] for step in h[:length]] for h in runs]
            for run in values:
                ax.plot(np.arange(length), run, color=COLORS[method], linewidth=0.5, alpha=0.35)
            _band(ax, np.arange(length), values, COLORS[method],
                  f"{LABELS[method]}: mean ± sd of {_runs(len(runs))} (thin: each run)", log, bounds)
            if zoom_steps:
                zoom.plot(np.arange(zoom_steps), values[0][:zoom_steps], color=COLORS[method], linewidth=1,
                          label=f"{LABELS[method]}, run {by_method[method][0]['seed']}")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
        if zoom_steps:
            steps = np.arange(zoom_steps)
            predicted = (steps // window) % period != 0
            run0 = np.array([s[key] for s in histories["proposed"][0][:zoom_steps]])
            for start in steps[predicted & (steps % window == 0)]:
                zoom.axvspan(start - 0.5, start + window * (period - 1) - 0.5, color="0.85", linewidth=0)
            zoom.scatter(steps[~predicted], run0[~predicted], s=10, color=COLORS["proposed"], zorder=3,
                         label="proposed: hypergradient step")
            zoom.scatter(steps[predicted], run0[predicted], s=10, facecolors="none", zorder=3,
                         edgecolors=COLORS["proposed"], label="proposed: predicted (grey windows)")
            zoom.set_xlim(-1, zoom_steps)
            zoom.set_title(f"zoom: first {zoom_steps} steps (m = {window}, P = {period})", fontsize=10)
            zoom.grid(alpha=0.3)
    axes[0][0].set_title(f"{dataset}: metaparameter trajectories")
    axes[1][0].set_xlabel("training step")
    axes[1][1].set_xlabel("training step")
    axes[0][0].legend(fontsize=8, loc="best")
    if zoom_steps:
        axes[0][1].legend(fontsize=7, loc="best")
    else:
        for ax in axes[:, 1]:
            ax.set_visible(False)
    return _save(fig, path)


def accuracy_curves(dataset: str, by_method: dict[str, list[dict]], path: Path) -> Path:
    """Test accuracy at every evaluation point (per epoch) per method, mean +- sd over runs."""
    fig = _figure(figsize=(8, 5))
    ax = fig.subplots()
    for method in _in_order(by_method):
        runs = by_method[method]
        length = min(len(r["evals"]) for r in runs)
        epochs = [e["epoch"] for e in runs[0]["evals"][:length]]
        _band(ax, epochs, [[e["test_acc"] for e in r["evals"][:length]] for r in runs],
              COLORS.get(method, "black"), f"{LABELS.get(method, method)} ({_runs(len(runs))})", bounds=(0.0, 1.0))
    ax.set_xlabel("epoch (full passes over the training split)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{dataset}: test accuracy per epoch, mean ± sd over runs (clipped to [0, 1])"
                 + ("; hyperopt: final training" if "hyperopt" in by_method else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def accuracy_vs_cost(dataset: str, by_method: dict[str, list[dict]], path: Path) -> Path:
    """Final test accuracy (each run, and the mean) against cost in plain-step equivalents."""
    fig = _figure(figsize=(8, 5))
    ax = fig.subplots()
    seen: list[float] = []  # mean costs drawn so far
    for method in _in_order(by_method):
        runs = by_method[method]
        cost = np.array([r["steps"] + _hypergradient_cost(r) * r["hypergrad_evals"] for r in runs])
        # methods of equal cost (the fixed-lambda ones) are drawn side by side, 3% apart; others where they are
        position = sum(bool(np.isclose(cost.mean(), other)) for other in seen)
        seen.append(float(cost.mean()))
        cost = cost * 1.03**position
        acc = np.array([r["final_test_acc"] for r in runs])
        color = COLORS.get(method, "black")
        ax.scatter(cost, acc, s=14, color=color, alpha=0.45)
        mean, sd = acc.mean(), (acc.std(ddof=1) if len(acc) > 1 else 0.0)
        yerr = [[mean - max(mean - sd, 0.0)], [min(mean + sd, 1.0) - mean]]  # clipped to [0, 1]
        ax.errorbar(cost.mean(), mean, yerr=yerr if len(acc) > 1 else None, fmt="D",
                    color=color, markersize=8, capsize=4, label=f"{LABELS.get(method, method)} (mean ± sd)")
    ax.set_xscale("log")
    ax.set_xlabel("cost per run, plain-step equivalents\n(steps + c × hypergradients; c = "
                  + ", ".join(f"{v} {k}" for k, v in HYPERGRADIENT_COST.items()) + ")")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"{dataset}: accuracy against cost (dots: runs; equal costs drawn side by side)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_figures(out: Path) -> dict[str, list[Path]]:
    """All figures for every dataset under `out`, into out/figures/; returns the paths per dataset."""
    out = Path(out)
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[Path]] = {}
    for dataset, by_method in sorted(finished_runs(out, warn=lambda message: None).items()):  # report warns
        paths = [trajectories(dataset, by_method, folder / f"{dataset}_trajectories.png"),
                 accuracy_curves(dataset, by_method, folder / f"{dataset}_accuracy.png"),
                 accuracy_vs_cost(dataset, by_method, folder / f"{dataset}_cost.png")]
        made[dataset] = [p for p in paths if p is not None]
    return made
