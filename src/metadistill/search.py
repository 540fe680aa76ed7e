"""The hyperopt TPE baseline: each trial a full training with fixed lambda, scored on validation only."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from hyperopt import STATUS_FAIL, STATUS_OK, Trials, base, fmin, hp, tpe
from hyperopt.exceptions import AllTrialsFailed

from .batched import Outcome, fit_batched
from .meta import Metaparameters
from .records import write_atomic
from .strategies import Fixed
from .train import DivergenceError, Problem, RunResult, TrainConfig, fit

SPACE = {"lambda1": hp.uniform("lambda1", 0.0, 1.0), "log10_temperature": hp.uniform("log10_temperature", -1.0, 1.0)}


def hyperopt_search(
    problem: Problem,
    config: TrainConfig,
    seed: int,
    trials: int = 5,
    progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """TPE over lambda1 ~ U(0, 1), log10 T ~ U(-1, 1): `trials` trainings with fixed lambda on the train
    split, each scored by its final validation accuracy, then one final training with the best lambda.

    The result is the final training's, with cost counters summed over all `trials + 1` trainings
    and the trials listed in `extra["trials"]`. The test set takes no part in the search. A trial
    whose training diverges is a failed evaluation (recorded, never chosen); only when every trial
    diverges does the search raise DivergenceError. Note that TPE draws its first 20 points at
    random, so a paper-sized budget of 5 trials is a seeded random search.
    """
    started = time.perf_counter()
    history: list[dict] = []
    done_steps = 0

    def train(lam: Metaparameters) -> RunResult:
        nonlocal done_steps
        offset = done_steps

        def report(step: int, total: int) -> None:
            if progress is not None:
                progress(offset + step, total * (trials + 1))

        result = fit(problem, Fixed(lam, "hyperopt"), config, seed, progress=report)
        done_steps += result.steps
        return result

    def objective(point: dict) -> dict:
        lam = _point_lam(point)
        trial_started = time.perf_counter()
        try:
            result = train(lam)
        except DivergenceError as error:
            # A diverging trial is a failed evaluation for TPE, not the end of the search.
            history.append({"lambda1": lam.lambda1, "temperature": lam.temperature, "val_acc": None,
                            "diverged": str(error), "steps": 0, "wall_s": time.perf_counter() - trial_started})
            return {"status": STATUS_FAIL}
        history.append({"lambda1": lam.lambda1, "temperature": lam.temperature,
                        "val_acc": result.final_val_acc, "steps": result.steps, "wall_s": result.wall_s})
        return {"loss": -result.final_val_acc, "status": STATUS_OK}

    try:
        fmin(objective, SPACE, algo=tpe.suggest, max_evals=trials, trials=Trials(),
             rstate=np.random.default_rng(seed), show_progressbar=False)
    except AllTrialsFailed:
        pass  # reported below, with the reason

    scored = [trial for trial in history if trial["val_acc"] is not None]
    if not scored:
        raise DivergenceError(f"all {trials} hyperopt trials diverged (seed {seed})")
    best = max(scored, key=lambda trial: trial["val_acc"])  # first of equals, as hyperopt
    final = train(Metaparameters(best["lambda1"], best["temperature"]))
    final.full_trainings = trials + 1
    final.steps = sum(trial["steps"] for trial in history) + final.steps  # diverged trials count 0
    final.wall_s = time.perf_counter() - started
    final.extra = {"trials": history, "best": best}
    return final


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
        self.trials = Trials()
        self.rstate = np.random.default_rng(seed)
        self.domain = base.Domain(_unused_objective, SPACE)
        self.pending: dict | None = None

    def ask(self) -> Metaparameters:
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
        assert self.pending is not None, "ask() first"
        self.pending["state"] = base.JOB_STATE_DONE
        self.pending["result"] = {"status": STATUS_FAIL} if val_acc is None else {"loss": -val_acc,
                                                                                 "status": STATUS_OK}
        self.pending = None
        self.trials.refresh()


def hyperopt_search_batched(
    problem: Problem,
    config: TrainConfig,
    seeds: list[int],
    trials: int = 5,
    progress: Callable[[int, int], None] | None = None,
    checkpoint_dir: Path | None = None,
    identity: Any = None,
    checkpoint_every_s: float = 30.0,
) -> list[Outcome]:
    """`hyperopt_search` for several runs at once: the R searches advance together, trial k of every run
    trained as one batch (`fit_batched`), then the R final trainings as one batch.

    With `checkpoint_dir`, the searches' finished trials are kept in search.json and every training in
    progress checkpoints itself, so an interrupted search resumes (the searches are replayed from the
    recorded trials; TPE is deterministic given its seed and results). The wall time counts each
    training's own wall time, so the part of a training done before an interruption is counted too.
    """
    started = time.perf_counter()
    runs = len(seeds)
    searches = [TPESearch(seed) for seed in seeds]
    histories: list[list[dict]] = [[] for _ in seeds]
    earlier_wall = 0.0
    state_path = None if checkpoint_dir is None else Path(checkpoint_dir) / "search.json"
    if state_path is not None and state_path.exists():
        saved = json.loads(state_path.read_text())
        if saved.get("identity") == identity and saved.get("seeds") == list(seeds):
            histories, earlier_wall = saved["histories"], saved["wall_s"]
    # Replay the finished trials (the same points come out, since TPE is seeded), then go on.
    for search, history in zip(searches, histories):
        for trial in history:
            search.ask()
            search.tell(trial["val_acc"])
    total = trials + 1

    def trial_progress(k: int) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda step, steps: progress(k * steps + step, total * steps)

    time_in_trainings = trainings_wall = 0.0  # this process's time in fit_batched; those trainings' own wall

    def train(lams: list[Metaparameters], run_seeds: list[int], k: int, name: str, key: Any) -> list[Outcome]:
        nonlocal time_in_trainings, trainings_wall
        entered = time.perf_counter()
        outcomes = fit_batched(problem, [Fixed(lam, "hyperopt") for lam in lams], config, run_seeds,
                               trial_progress(k), None if checkpoint_dir is None else Path(checkpoint_dir) / name,
                               [identity, key, [lam.as_tuple() for lam in lams]], checkpoint_every_s)
        time_in_trainings += time.perf_counter() - entered
        trainings_wall += sum(outcome.wall_s for outcome in outcomes)
        return outcomes

    def wall() -> float:
        return earlier_wall + time.perf_counter() - started - time_in_trainings + trainings_wall

    for k in range(len(histories[0]), trials):
        lams = [search.ask() for search in searches]
        outcomes = train(lams, seeds, k, f"trial_{k}.ckpt", k)
        for search, history, lam, outcome in zip(searches, histories, lams, outcomes):
            if isinstance(outcome, DivergenceError):
                search.tell(None)
                history.append({"lambda1": lam.lambda1, "temperature": lam.temperature, "val_acc": None,
                                "diverged": str(outcome), "steps": 0, "wall_s": outcome.wall_s})
            else:
                search.tell(outcome.final_val_acc)
                history.append({"lambda1": lam.lambda1, "temperature": lam.temperature,
                                "val_acc": outcome.final_val_acc, "steps": outcome.steps, "wall_s": outcome.wall_s})
        if state_path is not None:
            write_atomic(state_path, json.dumps({"identity": identity, "seeds": list(seeds), "histories": histories,
                                                 "wall_s": wall()}))

    results: list[Outcome | None] = [None] * runs
    finals: list[tuple[int, dict]] = []
    for r, history in enumerate(histories):
        scored = [trial for trial in history if trial["val_acc"] is not None]
        if not scored:
            results[r] = DivergenceError(f"all {trials} hyperopt trials diverged (seed {seeds[r]})")
        else:
            finals.append((r, max(scored, key=lambda trial: trial["val_acc"])))  # first of equals, as hyperopt
    if finals:
        lams = [Metaparameters(best["lambda1"], best["temperature"]) for _, best in finals]
        outcomes = train(lams, [seeds[r] for r, _ in finals], trials, "final.ckpt", "final")
        total_wall = wall()
        for (r, best), outcome in zip(finals, outcomes):
            if isinstance(outcome, RunResult):
                outcome.full_trainings = trials + 1
                outcome.steps = sum(trial["steps"] for trial in histories[r]) + outcome.steps
                outcome.wall_s = total_wall / runs
                outcome.extra = {"trials": histories[r], "best": best, "batch_runs": runs, "batch_wall_s": total_wall}
            results[r] = outcome
    return [outcome for outcome in results if outcome is not None]  # every run has one by now
