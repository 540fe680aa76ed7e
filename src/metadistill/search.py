"""The hyperopt TPE baseline: each trial a full training with fixed lambda, scored on validation only."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from hyperopt import STATUS_FAIL, STATUS_OK, Trials, fmin, hp, tpe
from hyperopt.exceptions import AllTrialsFailed

from .meta import Metaparameters
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
        lam = Metaparameters.clamped(point["lambda1"], 10.0 ** point["log10_temperature"])
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
