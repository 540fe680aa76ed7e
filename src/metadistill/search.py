"""The hyperopt TPE baseline: each trial a full training with fixed lambda, scored on validation only."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from hyperopt import STATUS_OK, Trials, fmin, hp, tpe

from .meta import Metaparameters
from .strategies import Fixed
from .train import Problem, RunResult, TrainConfig, fit

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
    and the trials listed in `extra["trials"]`. The test set takes no part in the search.
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
        result = train(lam)
        history.append({"lambda1": lam.lambda1, "temperature": lam.temperature,
                        "val_acc": result.final_val_acc, "steps": result.steps, "wall_s": result.wall_s})
        return {"loss": -result.final_val_acc, "status": STATUS_OK}

    fmin(objective, SPACE, algo=tpe.suggest, max_evals=trials, trials=Trials(),
         rstate=np.random.default_rng(seed), show_progressbar=False)
    best = max(history, key=lambda trial: trial["val_acc"])  # first of equals, as hyperopt
    final = train(Metaparameters(best["lambda1"], best["temperature"]))
    final.full_trainings = trials + 1
    final.steps = sum(trial["steps"] for trial in history) + final.steps
    final.wall_s = time.perf_counter() - started
    final.extra = {"trials": history, "best": best}
    return final
