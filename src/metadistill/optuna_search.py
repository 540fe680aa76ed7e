"""The Optuna baseline: TPE with a pruner over fixed lambda, within a budget of student steps, scored on validation.

Each trial trains the student with fixed (lambda1, T) drawn by Optuna's TPE sampler over lambda1 ~ U(0, 1),
log10 T ~ U(-1, 1) (the hyperopt baseline's space), reports its validation accuracy at every evaluation (every
epoch by default) and is stopped there when the pruner says so. The budget is counted in student steps: by
default that of the paper's hyperopt (trials + 1 = 6 full trainings); a new trial starts only while a whole
training still fits, so the budget is never exceeded. The run's result is the best trial that ran to the end,
by final validation accuracy, itself: it already is a full training with that lambda, so it is not retrained.
The test set takes no part in any choice.

Deterministic given the seed: the sampler of trial k is seeded by (seed, k), so a search interrupted and
replayed from its finished trials (kept in `checkpoint_dir`/optuna.json; a trial in progress checkpoints
itself) makes the same choices as one that was not.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .engine import Data, Outcome, train_runs
from .files import write_atomic
from .meta import Metaparameters
from .problem import steps_per_epoch
from .results import DivergenceError, RunResult, SearchWall
from .strategies import Fixed
from .train import Schedule, TrainConfig

PRUNERS = ("median", "halving")


def require_optuna() -> Any:
    """The optuna module (quieted), or ImportError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise ImportError("method optuna needs optuna: pip install 'metadistill[optuna]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class _Search:
    """One run's Optuna study, its finished trials kept as JSON so that it can be replayed."""

    def __init__(self, seed: int, pruner: str, state_path: Path | None, identity: Any) -> None:
        self.optuna = require_optuna()
        self.seed, self.state_path, self.identity = seed, state_path, identity
        dist = self.optuna.distributions.FloatDistribution
        self.space = {"lambda1": dist(0.0, 1.0), "log10_temperature": dist(-1.0, 1.0)}
        pruners = self.optuna.pruners
        # the reports' step is the student step, so a trial can be pruned from its first evaluation on (an epoch on
        # the image datasets); Optuna's default warm-up, none. (This read n_warmup_steps=1 before: the same.)
        chosen = (pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if pruner == "median"
                  else pruners.SuccessiveHalvingPruner())
        self.study = self.optuna.create_study(direction="maximize", pruner=chosen)
        self.trials: list[dict] = []
        self.wall = SearchWall()  # each trial counts its own wall time (summed over its resumptions)
        if state_path is not None and state_path.exists():
            saved = json.loads(state_path.read_text())
            if saved.get("identity") == identity:
                for trial in saved["trials"]:
                    self._add(trial)
                # (a file written before the search's own wall time was kept: its trials' wall times)
                self.wall = SearchWall(saved.get("wall_s", sum(trial["wall_s"] for trial in saved["trials"])))

    def _add(self, trial: dict) -> None:
        states = self.optuna.trial.TrialState
        self.study.add_trial(self.optuna.trial.create_trial(
            state=states[trial["state"]], value=trial["val_acc"] if trial["state"] == "COMPLETE" else None,
            params={"lambda1": trial["lambda1"], "log10_temperature": trial["log10_temperature"]},
            distributions=self.space, intermediate_values={int(k): v for k, v in trial["reports"].items()}))
        self.trials.append(trial)

    def ask(self) -> Any:
        self.study.sampler = self.optuna.samplers.TPESampler(seed=self.seed * 100003 + len(self.trials))
        return self.study.ask(self.space)

    def tell(self, trial: Any, record: dict, result: Outcome) -> None:
        states = self.optuna.trial.TrialState
        if record["state"] == "COMPLETE":
            self.study.tell(trial, record["val_acc"])
        else:
            self.study.tell(trial, state=states[record["state"]])
        self.trials.append(record)
        if self.state_path is not None:
            write_atomic(self.state_path, json.dumps({"identity": self.identity, "trials": self.trials,
                                                      "wall_s": self.wall()}))


def optuna_search(problem: Data, config: TrainConfig, seed: int, budget_trainings: float = 6.0,
                  pruner: str = "median", progress: Callable[[int, int], None] | None = None,
                  checkpoint_dir: Path | None = None, identity: Any = None) -> RunResult:
    """The Optuna TPE + pruner search of one run (see the module docstring); its RunResult is the best
    completed trial's training, with cost counters summed over every trial and the trials in extra."""
    if pruner not in PRUNERS:
        raise ValueError(f"pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    total = Schedule.of(config, steps_per_epoch(problem, config.batch_size)).total_steps
    budget = int(budget_trainings * total)
    search = _Search(seed, pruner, None if checkpoint_dir is None else Path(checkpoint_dir) / "optuna.json",
                     identity)
    results: dict[int, RunResult] = {}
    used = sum(trial["steps"] for trial in search.trials)
    while used + total <= budget:
        number = len(search.trials)
        trial = search.ask()
        lam = Metaparameters.clamped(trial.params["lambda1"], 10.0 ** trial.params["log10_temperature"])
        reports: dict[int, float] = {}

        def report(step: int, points: list[dict], trial: Any = trial, reports: dict = reports) -> bool:
            reports[step] = points[0]["val_acc"]
            trial.report(points[0]["val_acc"], step)
            return step < total and trial.should_prune()

        ticker = None if progress is None else (lambda step, steps, done=used: progress(done + step, budget))
        entered = time.perf_counter()
        outcome = train_runs(problem, [Fixed(lam, "optuna")], config, [seed], ticker,
                             None if checkpoint_dir is None else Path(checkpoint_dir) / f"trial_{number}.ckpt",
                             [identity, number], on_evaluation=report)[0]
        search.wall.add_training(entered, outcome.wall_s)
        record = {"lambda1": lam.lambda1, "temperature": lam.temperature, "log10_temperature":
                  trial.params["log10_temperature"], "reports": reports, "wall_s": outcome.wall_s}
        if isinstance(outcome, DivergenceError):
            record.update(state="FAIL", val_acc=None, steps=0 if outcome.step is None else outcome.step + 1)
        else:
            done = outcome.steps == total
            record.update(state="COMPLETE" if done else "PRUNED", val_acc=outcome.final_val_acc if done else None,
                          steps=outcome.steps)
            if done:
                results[number] = outcome
        search.tell(trial, record, outcome)
        used += record["steps"]
    return _best(search.trials, results, seed, search.wall, problem, config)


def _best(trials: list[dict], results: dict[int, RunResult], seed: int, wall: SearchWall, problem: Data,
          config: TrainConfig) -> RunResult:
    complete = [k for k, trial in enumerate(trials) if trial["state"] == "COMPLETE"]
    if not complete:
        raise DivergenceError(f"no optuna trial ran to the end (seed {seed}): all were pruned or diverged")
    best = max(complete, key=lambda k: trials[k]["val_acc"])  # first of equals
    result = results.get(best)
    if result is None:  # finished before an interruption: its training is replayed (the same numbers; its time
        # is not the search's, whose wall time counted the trial once)
        lam = Metaparameters(trials[best]["lambda1"], trials[best]["temperature"])
        entered = time.perf_counter()
        result = train_runs(problem, [Fixed(lam, "optuna")], config, [seed])[0]
        wall.add_training(entered, 0.0)
        assert isinstance(result, RunResult)
    result.method = "optuna"
    result.steps = sum(trial["steps"] for trial in trials)
    result.full_trainings = len(trials)
    result.wall_s = wall()
    result.extra = {**result.extra, "trials": trials, "best": trials[best],
                    "final": "the best completed trial itself (not retrained)"}
    return result
