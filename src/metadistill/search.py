"""The hyperopt TPE baseline: each trial a full training with fixed lambda, scored on validation only.

One driver serves one search and R searches alike: the R searches advance together (`TPESearch`, an
ask/tell view of hyperopt's fmin), trial k of every run trained as one batch (`engine.fit_batched`),
then the R final trainings as one batch; `hyperopt_search` is the case R = 1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .engine import Outcome, fit_batched
from .files import write_atomic
from .meta import Metaparameters
from .problem import Problem
from .results import DivergenceError, RunResult, SearchWall
from .strategies import Fixed
from .train import TrainConfig


def space() -> dict:
    """The search space: lambda1 ~ U(0, 1), log10 T ~ U(-1, 1). (hyperopt, and the scipy.stats it imports, load
    here, not with metadistill: they take seconds to import.)"""
    from hyperopt import hp

    return {"lambda1": hp.uniform("lambda1", 0.0, 1.0),
            "log10_temperature": hp.uniform("log10_temperature", -1.0, 1.0)}


Progress = Callable[[int, int], None]


def _point_lam(point: dict) -> Metaparameters:
    return Metaparameters.clamped(point["lambda1"], 10.0 ** point["log10_temperature"])


def _unused_objective(point: dict) -> dict:
    raise RuntimeError("TPESearch evaluates its trials outside hyperopt")


class TPESearch:
    """One TPE search driven from outside, a trial at a time: `ask()` a point, train it, `tell()` the result.

    It makes the same calls, with the same seeds, as fmin(..., algo=tpe.suggest, trials=Trials(),
    rstate=np.random.default_rng(seed)) does in its serial loop, so the suggestions are fmin's; this is
    what lets R searches advance together with trial k of every run trained as one batch.
    """

    def __init__(self, seed: int) -> None:
        from hyperopt import Trials, base

        self.trials = Trials()
        self.rstate = np.random.default_rng(seed)
        self.domain = base.Domain(_unused_objective, space())
        self.pending: dict | None = None

    def ask(self) -> Metaparameters:
        from hyperopt import base, tpe

        assert self.pending is None, "tell() the last point first"
        new_ids = self.trials.new_trial_ids(1)
        self.trials.refresh()
        docs = tpe.suggest(new_ids, self.domain, self.trials, self.rstate.integers(2**31 - 1))
        self.trials.insert_trial_docs(docs)
        self.trials.refresh()
        self.pending = self.trials._dynamic_trials[-1]
        return _point_lam(base.spec_from_misc(self.pending["misc"]))

    def tell(self, val_acc: float | None) -> None:
        """The trial's final validation accuracy, or None when its training diverged (a failed trial)."""
        from hyperopt import base

        assert self.pending is not None, "ask() first"
        self.pending["state"] = base.JOB_STATE_DONE
        self.pending["result"] = {"status": base.STATUS_FAIL} if val_acc is None else {
            "loss": -val_acc, "status": base.STATUS_OK}
        self.pending = None
        self.trials.refresh()


class _Searches:
    """R TPE searches advancing together, with their finished trials kept in `checkpoint_dir`/search.json."""

    def __init__(self, problem: Problem, config: TrainConfig, seeds: list[int], trials: int,
                 progress: Progress | None, checkpoint_dir: Path | None, identity: Any,
                 checkpoint_every_s: float) -> None:
        self.problem, self.config, self.seeds, self.trials = problem, config, seeds, trials
        self.progress, self.checkpoint_dir, self.identity = progress, checkpoint_dir, identity
        self.checkpoint_every_s = checkpoint_every_s
        self.searches = [TPESearch(seed) for seed in seeds]
        self.histories: list[list[dict]] = [[] for _ in seeds]
        self.wall = SearchWall()  # each training counts its own wall time (summed over its resumptions)
        self.state_path = None if checkpoint_dir is None else Path(checkpoint_dir) / "search.json"
        if self.state_path is not None and self.state_path.exists():
            saved = json.loads(self.state_path.read_text())
            if saved.get("identity") == identity and saved.get("seeds") == list(seeds):
                self.histories, self.wall = saved["histories"], SearchWall(saved["wall_s"])
        # Replay the finished trials (the same points come out, since TPE is seeded), then go on.
        for search, history in zip(self.searches, self.histories):
            for trial in history:
                search.ask()
                search.tell(trial["val_acc"])

    def train(self, lams: list[Metaparameters], seeds: list[int], k: int, name: str) -> list[Outcome]:
        """Training k (trial k, or the final one: k = trials) of the runs `seeds` with fixed `lams`."""
        total = self.trials + 1
        report = None if self.progress is None else (
            lambda step, steps: self.progress(k * steps + step, total * steps))  # type: ignore[misc]
        entered = time.perf_counter()
        outcomes = fit_batched(self.problem, [Fixed(lam, "hyperopt") for lam in lams], self.config, seeds, report,
                               None if self.checkpoint_dir is None else Path(self.checkpoint_dir) / name,
                               [self.identity, k, [lam.as_tuple() for lam in lams]], self.checkpoint_every_s)
        self.wall.add_training(entered, sum(outcome.wall_s for outcome in outcomes))
        return outcomes

    def run_trial(self, k: int) -> None:
        lams = [search.ask() for search in self.searches]
        for search, history, lam, outcome in zip(self.searches, self.histories, lams,
                                                 self.train(lams, self.seeds, k, f"trial_{k}.ckpt")):
            diverged = isinstance(outcome, DivergenceError)
            search.tell(None if diverged else outcome.final_val_acc)
            trial = {"lambda1": lam.lambda1, "temperature": lam.temperature,
                     "val_acc": None if diverged else outcome.final_val_acc,
                     "steps": 0 if diverged else outcome.steps, "wall_s": outcome.wall_s}
            history.append({**trial, "diverged": str(outcome)} if diverged else trial)
        if self.state_path is not None:
            write_atomic(self.state_path, json.dumps({"identity": self.identity, "seeds": list(self.seeds),
                                                      "histories": self.histories, "wall_s": self.wall()}))

    def finish(self) -> list[Outcome]:
        """The final training of each run with its best trial's lambda (first of equals, as hyperopt)."""
        runs = len(self.seeds)
        results: list[Outcome | None] = [None] * runs
        finals: list[tuple[int, dict]] = []
        for r, history in enumerate(self.histories):
            scored = [trial for trial in history if trial["val_acc"] is not None]
            if scored:
                finals.append((r, max(scored, key=lambda trial: trial["val_acc"])))
            else:
                results[r] = DivergenceError(f"all {self.trials} hyperopt trials diverged (seed {self.seeds[r]})")
        if finals:
            lams = [Metaparameters(best["lambda1"], best["temperature"]) for _, best in finals]
            outcomes = self.train(lams, [self.seeds[r] for r, _ in finals], self.trials, "final.ckpt")
            total_wall = self.wall()
            for (r, best), outcome in zip(finals, outcomes):
                if isinstance(outcome, RunResult):
                    outcome.full_trainings = self.trials + 1
                    outcome.steps = sum(trial["steps"] for trial in self.histories[r]) + outcome.steps
                    outcome.wall_s = total_wall / runs
                    outcome.extra = {"trials": self.histories[r], "best": best}
                    if runs > 1:
                        outcome.extra.update(batch_runs=runs, batch_wall_s=total_wall)
                results[r] = outcome
        return [outcome for outcome in results if outcome is not None]  # every run has one by now


def hyperopt_search_batched(
    problem: Problem,
    config: TrainConfig,
    seeds: list[int],
    trials: int = 5,
    progress: Progress | None = None,
    checkpoint_dir: Path | None = None,
    identity: Any = None,
    checkpoint_every_s: float = 30.0,
) -> list[Outcome]:
    """TPE over lambda1 ~ U(0, 1), log10 T ~ U(-1, 1) for the runs `seeds`: `trials` trainings with fixed
    lambda on the train split, each scored by its final validation accuracy, then one final training with
    the best lambda; outcome r is run r's RunResult (the final training's, with cost counters summed over
    all `trials + 1` trainings and the trials in `extra["trials"]`) or its DivergenceError.

    The test set takes no part in the search. A trial whose training diverges is a failed evaluation
    (recorded, never chosen); only when every trial of a run diverges is the run a DivergenceError. Note
    that TPE draws its first 20 points at random, so a paper-sized budget of 5 trials is a seeded random
    search. With `checkpoint_dir`, the searches' finished trials are kept in search.json and every
    training in progress checkpoints itself, so an interrupted search resumes (the searches are replayed
    from the recorded trials; TPE is deterministic given its seed and results).
    """
    searches = _Searches(problem, config, seeds, trials, progress, checkpoint_dir, identity, checkpoint_every_s)
    for k in range(len(searches.histories[0]), trials):
        searches.run_trial(k)
    return searches.finish()


def hyperopt_search(problem: Problem, config: TrainConfig, seed: int, trials: int = 5,
                    progress: Progress | None = None) -> RunResult:
    """`hyperopt_search_batched` for one run; raises DivergenceError when every trial diverged."""
    outcome = hyperopt_search_batched(problem, config, [seed], trials, progress)[0]
    if isinstance(outcome, DivergenceError):
        raise outcome
    return outcome
