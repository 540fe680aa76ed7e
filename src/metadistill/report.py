"""Results tables from recorded runs (never reruns anything): mean, sd, max, cost, the paper's column, and the
run-by-run comparison of the methods over the same seeds (report.md) with every run's numbers (runs.csv)."""

from __future__ import annotations

import csv
import io
import platform
from pathlib import Path

import numpy as np

from .config import method_order
from .files import write_atomic
from .records import diverged_runs, finished_runs

# The paper's table: test accuracy "mean (max)" over 10 runs.
PAPER = {
    "synthetic": {"no_distillation": "0.63 (0.63)", "naive": "0.63 (0.63)", "random": "0.64 (0.72)",
                  "gradient": "0.77 (0.78)", "hyperopt": "0.77 (0.78)", "proposed": "0.76 (0.78)"},
    "fashion-mnist": {"no_distillation": "0.87 (0.88)", "naive": "0.87 (0.88)", "random": "0.79 (0.88)",
                      "gradient": "0.88 (0.89)", "hyperopt": "0.87 (0.88)", "proposed": "0.88 (0.89)"},
    "cifar10-reduced": {"no_distillation": "0.55 (0.56)", "naive": "0.55 (0.56)", "random": "0.54 (0.57)",
                        "gradient": "0.57 (0.61)", "hyperopt": "0.55 (0.58)", "proposed": "0.57"},
    "cifar10": {"no_distillation": "0.65 (0.66)", "naive": "0.66 (0.67)", "random": "0.64 (0.67)",
                "gradient": "0.70 (0.72)", "hyperopt": "-", "proposed": "0.70 (0.72)"},
}
COLUMNS = ["method", "runs", "diverged", "mean", "sd", "max", "paper", "wall_s", "method_wall_s", "steps",
           "hypergrad_evals", "nonfinite_hypergrads", "full_trainings", "code"]


def summarize(dataset: str, by_method: dict[str, list[dict]], diverged: dict[str, list[dict]] | None = None
              ) -> list[dict]:
    """One row per method: test accuracy over its finished runs (mean, sample sd, max), the number of runs that
    diverged, mean cost per run and the code version(s) that produced the row."""
    rows = []
    for method in sorted(by_method, key=method_order):
        runs = by_method[method]
        acc = np.array([r["final_test_acc"] for r in runs], dtype=float)
        rows.append({
            "method": method,
            "runs": len(runs),
            "diverged": len((diverged or {}).get(method, [])),
            "mean": float(acc.mean()),
            "sd": float(acc.std(ddof=1)) if len(acc) > 1 else float("nan"),
            "max": float(acc.max()),
            "paper": PAPER.get(dataset, {}).get(method, "-"),
            "wall_s": float(np.mean([r["wall_s"] for r in runs])),
            # batched runs record their batch's wall time divided by its runs, so the sum is the method's
            "method_wall_s": float(np.sum([r["wall_s"] for r in runs])),
            "steps": float(np.mean([r["steps"] for r in runs])),
            "hypergrad_evals": float(np.mean([r["hypergrad_evals"] for r in runs])),
            "nonfinite_hypergrads": float(np.mean([r.get("nonfinite_hypergrads", 0) for r in runs])),
            "full_trainings": float(np.mean([r["full_trainings"] for r in runs])),
            "code": " ".join(sorted({r.get("extra", {}).get("code", "-") for r in runs})),
            "seeds": [r["seed"] for r in runs],
        })
    return rows


RUN_COLUMNS = ["dataset", "method", "seed", "status", "final_test_acc", "final_val_acc", "final_lambda1",
               "final_temperature", "steps", "hypergrad_evals", "full_trainings", "wall_s", "code"]


def per_run_rows(dataset: str, by_method: dict[str, list[dict]], diverged: dict[str, list[dict]] | None = None
                 ) -> list[dict]:
    """One row per recorded run, finished or diverged, in method then seed order (runs.csv)."""
    rows = []
    for method in sorted(set(by_method) | set(diverged or {}), key=method_order):
        runs = [(run, "finished") for run in by_method.get(method, [])]
        runs += [(info, "diverged") for info in (diverged or {}).get(method, [])]
        for run, status in sorted(runs, key=lambda pair: pair[0]["seed"]):
            rows.append({"dataset": dataset, "method": method, "seed": run["seed"], "status": status,
                         **{key: run.get(key) for key in RUN_COLUMNS[4:-1]},
                         "code": run.get("extra", {}).get("code", "-")})
    return rows


def run_by_run(by_method: dict[str, list[dict]], diverged: dict[str, list[dict]] | None = None) -> str:
    """Markdown: each seed's final test accuracy under every method, and for every pair of methods the mean
    difference over the seeds both finished, with the runs in which the first was ahead and behind. Empty with
    fewer than two methods."""
    methods = sorted(by_method, key=method_order)
    if len(methods) < 2:
        return ""
    acc = {method: {run["seed"]: float(run["final_test_acc"]) for run in by_method[method]} for method in methods}
    failed = {method: {info["seed"] for info in (diverged or {}).get(method, [])} for method in methods}
    seeds = sorted({seed for method in methods for seed in acc[method]} | {s for f in failed.values() for s in f})

    def cell(method: str, seed: int) -> str:
        return f"{acc[method][seed]:.4f}" if seed in acc[method] else "diverged" if seed in failed[method] else "-"

    lines = ["Final test accuracy of each run (run r: seed r for every method):", "",
             "| seed | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
    lines += ["| " + " | ".join([str(seed), *(cell(method, seed) for method in methods)]) + " |" for seed in seeds]
    lines += ["", "Row minus column, run by run over the seeds both finished: mean difference of test accuracy "
              "(in how many runs the row was ahead of the column, and behind it).", "",
              "| | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
    for row in methods:
        cells = []
        for column in methods:
            common = sorted(set(acc[row]) & set(acc[column]))
            if row == column or not common:
                cells.append("")
                continue
            differences = np.array([acc[row][seed] - acc[column][seed] for seed in common])
            ahead, behind = int((differences > 1e-12).sum()), int((differences < -1e-12).sum())
            cells.append(f"{round(float(differences.mean()), 4) + 0.0:+.4f} ({ahead} ahead, {behind} behind)")
        lines.append("| " + " | ".join([row, *cells]) + " |")
    return "\n".join(lines)


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        if np.isnan(value):
            return "-"
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    header = ["method", "runs", "diverged", "test acc mean (max)", "sd", "paper mean (max)", "wall s / run",
              "wall s, all runs", "student steps / run", "hypergradients / run", "non-finite hypergradients / run",
              "trainings started / run", "code version"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([
            row["method"], str(row["runs"]), str(row["diverged"]), f"{row['mean']:.3f} ({row['max']:.3f})",
            _fmt(row["sd"]), row["paper"], _fmt(row["wall_s"], 1), _fmt(row["method_wall_s"], 1),
            _fmt(row["steps"], 0), _fmt(row["hypergrad_evals"], 0), _fmt(row["nonfinite_hypergrads"], 1),
            _fmt(row["full_trainings"], 0), row["code"]]) + " |")
    return "\n".join(lines)


def text_table(rows: list[dict]) -> str:
    """The table for a terminal: fixed-width columns."""
    header = ["method", "runs", "diverged", "mean", "sd", "max", "paper", "wall s", "steps", "hypergrads", "trainings"]
    body = [[r["method"], str(r["runs"]), str(r["diverged"]), _fmt(r["mean"]), _fmt(r["sd"]), _fmt(r["max"]),
             r["paper"], _fmt(r["wall_s"], 1), _fmt(r["steps"], 0), _fmt(r["hypergrad_evals"], 0),
             _fmt(r["full_trainings"], 0)] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> str:
    import torch

    threads = torch.get_num_threads()
    return (f"Python {platform.python_version()}, torch {torch.__version__} ({threads} thread{'s' * (threads != 1)}), "
            f"numpy {np.__version__}; {cpu_model()}; {platform.system()} {platform.release()}")


def write_report(out: Path) -> dict[str, list[dict]]:
    """report.md, results.csv and runs.csv (every run, finished or diverged) under `out` from the records; returns
    the rows per dataset."""
    out = Path(out)
    runs = finished_runs(out)
    diverged = diverged_runs(out)
    tables = {dataset: summarize(dataset, by_method, diverged.get(dataset))
              for dataset, by_method in sorted(runs.items())}
    parts = ["# metadistill results", "",
             "Final test accuracy over runs (run r uses seed r for every method): mean (max), sample sd; "
             "cost is the mean per run (student steps count every step of every training; trainings started count "
             "the searches' trials and members, pruned ones too). Runs trained together as one batch (batch_runs) "
             "record the batch's wall time divided by its runs; \"wall s, all runs\" is the method's total. The "
             "paper's column is its table (10 runs). Runs that diverged are counted apart and not in the accuracy; "
             "\"code version\" names the code that produced the row's runs.", ""]
    for dataset, rows in tables.items():
        parts += [f"## {dataset}", "", markdown_table(rows), ""]
        for method, infos in sorted(diverged.get(dataset, {}).items()):
            parts += [f"- {method} run {info['seed']} diverged: {info['message']}" for info in infos] + [""]
        paired = run_by_run(runs[dataset], diverged.get(dataset))
        if paired:
            parts += ["### Run by run", "", paired, ""]
        teacher = sorted({run["extra"]["teacher_test_acc"] for method_runs in runs[dataset].values()
                          for run in method_runs if "teacher_test_acc" in run.get("extra", {})})
        if teacher:
            parts += ["Teacher test accuracy: " + ", ".join(f"{acc:.3f}" for acc in teacher) + ".", ""]
        for figure, caption in (("trajectories", "lambda1 and T against step (the gradient methods; pbt: its "
                                                  "best member's lineage)"),
                                ("accuracy", "test accuracy against epoch"),
                                ("cost", "final test accuracy against cost")):
            if (out / "figures" / f"{dataset}_{figure}.png").exists():
                parts += [f"![{dataset}: {caption}](figures/{dataset}_{figure}.png)", ""]
    recorded = sorted({f"torch {run['extra']['torch']} on {run['extra']['threads']} thread(s)"
                       for by_method in runs.values() for method_runs in by_method.values()
                       for run in method_runs if "torch" in run.get("extra", {})})
    parts += ["## Environment", "", "Report built with " + environment() + ".", ""]
    if recorded:
        parts += ["Runs recorded with " + "; ".join(recorded) + ".", ""]
    write_atomic(out / "report.md", "\n".join(parts))
    write_atomic(out / "results.csv", csv_text(tables))
    write_atomic(out / "runs.csv", runs_csv_text([row for dataset, by_method in sorted(runs.items())
                                                  for row in per_run_rows(dataset, by_method, diverged.get(dataset))]))
    return tables


def csv_text(tables: dict[str, list[dict]]) -> str:
    return _csv(["dataset", *COLUMNS],
                [{"dataset": dataset, **row} for dataset, rows in tables.items() for row in rows])


def runs_csv_text(rows: list[dict]) -> str:
    return _csv(RUN_COLUMNS, rows)


def _csv(fieldnames: list[str], rows: list[dict]) -> str:
    """`rows` as CSV: the columns in `fieldnames` (other keys left out), floats to 6 significant digits, None
    empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: f"{value:.6g}" if isinstance(value, float) else value for key, value in row.items()}
                     for row in rows)
    return buffer.getvalue()
