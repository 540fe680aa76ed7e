"""The Optuna baseline: validation-only choices, determinism, resume, the step budget."""

import dataclasses
import time

import pytest

from metadistill.data.synthetic import synthetic_problem
from metadistill.optuna_search import optuna_search
from metadistill.train import TrainConfig

pytest.importorskip("optuna")
CONFIG = TrainConfig(epochs=30, batch_size=0, lr=1.0, t_val=0.1, eval_every=5)


@pytest.fixture(scope="module")
def problem():
    return synthetic_problem(0, 500, 0.01)[0]


def choices(result):
    return [(t["lambda1"], t["temperature"], t["state"], t["val_acc"], t["steps"]) for t in result.extra["trials"]]


def test_trials_are_pruned_within_the_step_budget_and_the_best_completed_trial_is_the_result(problem):
    result = optuna_search(problem, CONFIG, seed=3, budget_trainings=6)
    trials = result.extra["trials"]
    assert result.steps == sum(t["steps"] for t in trials) <= 6 * CONFIG.epochs
    assert len(trials) > 6  # pruned trials leave room for more than hyperopt's 6 trainings
    assert {t["state"] for t in trials} >= {"COMPLETE", "PRUNED"}
    best = max((t for t in trials if t["state"] == "COMPLETE"), key=lambda t: t["val_acc"])
    assert (result.final_lambda1, result.final_temperature) == (best["lambda1"], best["temperature"])
    assert result.final_val_acc == best["val_acc"] and result.method == "optuna"


def test_the_choice_never_looks_at_the_test_set(problem):
    poisoned = dataclasses.replace(problem, y_test=1 - problem.y_test)  # every test label wrong
    clean, dirty = optuna_search(problem, CONFIG, seed=1), optuna_search(poisoned, CONFIG, seed=1)
    assert choices(clean) == choices(dirty)
    assert clean.final_test_acc != dirty.final_test_acc


def test_equal_seeds_give_equal_searches_and_other_seeds_other_ones(problem):
    assert choices(optuna_search(problem, CONFIG, seed=2)) == choices(optuna_search(problem, CONFIG, seed=2))
    assert choices(optuna_search(problem, CONFIG, seed=2)) != choices(optuna_search(problem, CONFIG, seed=4))


def test_an_interrupted_search_resumes_to_the_same_result(problem, tmp_path):
    whole = optuna_search(problem, CONFIG, seed=5)

    class Stop(Exception):
        pass

    slept = []

    def stop_in_trial_4(done, budget):
        if not slept:  # the first attempt takes 2 s more, in its first trial
            slept.append(time.sleep(2.0))
        if done >= 3 * CONFIG.epochs + 2 and (tmp_path / "optuna.json").exists():
            raise Stop

    with pytest.raises(Stop):
        optuna_search(problem, CONFIG, seed=5, progress=stop_in_trial_4, checkpoint_dir=tmp_path, identity="x")
    entered = time.perf_counter()
    resumed = optuna_search(problem, CONFIG, seed=5, checkpoint_dir=tmp_path, identity="x")
    took = time.perf_counter() - entered
    assert choices(resumed) == choices(whole)
    assert resumed.final_test_acc == whole.final_test_acc
    # the wall time counts the first attempt's trials too (not only the resumed process's time)
    assert resumed.wall_s > took + 1.5


def test_optuna_in_reproduce(tmp_path, capsys):
    from metadistill.cli import main

    out = tmp_path / "records"
    assert main(["reproduce", "--dataset", "synthetic", "--runs", "2", "--methods", "optuna,naive", "--out", str(out),
                 "--set", "epochs=30", "--set", "eval_every=10", "--set", "teacher_steps=500", "--quiet"]) == 0
    assert "optuna" in capsys.readouterr().out
    assert len(list(out.glob("synthetic/optuna/run_*/result.json"))) == 2
