"""The PBT baseline on Ray Tune: exploits at the interval copy the source's weights, the cost is every member's
steps, the choice is validation-only and seeded, an interrupted search goes on; one clear error without ray."""

import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile

import pytest
import torch

from metadistill.config import ConfigError, build_config
from metadistill.data.synthetic import synthetic_problem
from metadistill.experiment import run_experiment
from metadistill.pbt import PERTURBATION_FACTORS, pbt_search
from metadistill.results import DivergenceError
from metadistill.strategies import random_metaparameters
from metadistill.train import TrainConfig

CONFIG = TrainConfig(epochs=300, batch_size=0, lr=1.0, t_val=0.1, eval_every=100)
INTERVAL = 100


def steps_taken(extra: dict, population: int, steps: int) -> int:
    """Every member's whole training, less what each copier skipped: it goes on from the source's step, which
    Tune's synchronous mode lets differ, rarely, from the step the copier had reached (own_step)."""
    return population * steps - sum(event["step"] - event["own_step"] for event in extra["exploits"])


@pytest.fixture(scope="module")
def problem():
    return synthetic_problem(0, 500, 0.01)[0]


@pytest.fixture(scope="module")
def ray_runtime():
    """One local Ray runtime for the module (pbt_search uses a runtime already started), started as pbt_search
    starts its own: its workers at the caller's priority, not Ray's niceness 15 (at which the members waited for
    a core while any other process ran)."""
    pytest.importorskip("ray.tune")
    from metadistill.runtime import ray_runtime as started

    with started(None, 2, quiet=True):
        yield


@pytest.fixture(scope="module")
def searched_in(problem, ray_runtime, tmp_path_factory):
    """The search of seed 0 and its checkpoint directory (kept, as an interrupted search's would be)."""
    directory = tmp_path_factory.mktemp("pbt_seed_0")
    return pbt_search(problem, CONFIG, seed=0, population=2, checkpoint_dir=directory, identity="x"), directory


@pytest.fixture(scope="module")
def searched(searched_in):
    return searched_in[0]


def decisions(result) -> list[tuple]:
    """Each exploit as (step, the lambda explored, the weights copied), in step order: trial ids aside."""
    return sorted((event["step"], event["lambda1"], event["temperature"], event["weights_loaded"])
                  for event in result.extra["exploits"])


def test_a_population_of_two_exploits_at_every_interval_and_copies_the_weights(searched):
    events = searched.extra["exploits"]  # every member's, as they happened
    # synchronous PBT: at steps 100 and 200 (not at the end) the worse member copies the better one, its state at
    # that step; or, rarely, at its next result, which Tune's synchronous mode has let it reach before the copy
    # was taken (seen once in a suite run on idle cores: the exploits' steps were 200 and 200; see pbt.py)
    assert sorted(event["own_step"] for event in events) == [INTERVAL, 2 * INTERVAL]
    for event in events:
        assert event["copied"] != event["trial"] and event["step"] - event["own_step"] in (0, INTERVAL)
        assert event["weights_loaded"] == event["weights_saved"]  # the copy's weights are the source's
        for key in ("lambda1", "temperature"):  # explore: x0.8 or x1.2 (then bounds), or a resample
            ratio = event[key] / event[f"copied_{key}"]
            assert min(abs(ratio - factor) for factor in PERTURBATION_FACTORS) < 1e-9 or event[key] != event[
                f"copied_{key}"]


def test_the_cost_is_every_members_steps_and_the_result_is_the_best_member(searched):
    # each member took a whole training's steps, none repeated; less the steps a copier skipped, if its source
    # ran on before the copy (none where own_step == step, as nearly always)
    assert searched.steps == steps_taken(searched.extra, 2, CONFIG.epochs) > CONFIG.epochs
    assert searched.full_trainings == 2 and searched.hypergrad_evals == 0 and searched.method == "pbt"
    finals = [member["final_val_acc"] for member in searched.extra["members"]]
    assert searched.final_val_acc == max(finals)
    # the winner's lambda trajectory is its lineage: one value per step, changing only at exploits
    history = list(zip(searched.history["lambda1"], searched.history["temperature"]))
    assert len(history) == CONFIG.epochs
    changes = [step for step in range(1, len(history)) if history[step] != history[step - 1]]
    assert set(changes) <= {INTERVAL, 2 * INTERVAL}
    assert set(changes) == {event["step"] for event in searched.extra["lineage"]}


def test_equal_seeds_give_equal_searches_whatever_the_test_labels(problem, searched):
    poisoned = dataclasses.replace(problem, y_test=1 - problem.y_test)  # every test label wrong
    again = pbt_search(poisoned, CONFIG, seed=0, population=2)
    assert again.history["lambda1"] == searched.history["lambda1"]
    assert again.history["temperature"] == searched.history["temperature"]
    assert again.final_val_acc == searched.final_val_acc
    assert again.final_test_acc != searched.final_test_acc  # the test set was read, and changed nothing else


def test_an_interrupted_search_goes_on_from_the_members_last_common_checkpoint(problem, ray_runtime, tmp_path):
    sent = []

    def stop_after_two_intervals(steps, budget):  # Ctrl-C, as a user stops it: Tune stops its trials first
        if steps >= 4 * INTERVAL and not sent:
            sent.append(steps)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        pbt_search(problem, CONFIG, seed=1, population=2, checkpoint_dir=tmp_path, identity="x",
                   progress=stop_after_two_intervals)
    assert json.loads((tmp_path / "cost.json").read_text())["steps"] == 4 * INTERVAL
    resumed = pbt_search(problem, CONFIG, seed=1, population=2, checkpoint_dir=tmp_path, identity="x")
    assert resumed.steps == 2 * CONFIG.epochs  # the steps before the interruption are counted, not retaken
    assert len(resumed.history["lambda1"]) == CONFIG.epochs
    assert list(tmp_path.glob("pbt_seed_1_before_step_200"))  # it went on from step 200
    # the interruption came with the decision at step 200: taken before it, or (its exploit not yet carried out)
    # taken again after it; either way one decision per decision step, each synchronous
    assert [event["step"] for event in sorted(resumed.extra["exploits"], key=lambda e: e["step"])] == [100, 200]
    assert all(event["own_step"] == event["step"] for event in resumed.extra["exploits"])
    history = list(zip(resumed.history["lambda1"], resumed.history["temperature"]))
    changes = {step for step in range(1, len(history)) if history[step] != history[step - 1]}
    assert changes == {event["step"] for event in resumed.extra["lineage"]}


def test_a_search_killed_after_a_decision_goes_on_from_its_exploits_to_the_uninterrupted_result(
        problem, searched_in, tmp_path):
    """A process killed after the decision at step 200 was carried out, before any later checkpoint: each copier
    goes on from its state just after the exploit, so the search ends where the uninterrupted one did."""
    searched, directory = searched_in
    shutil.copytree(directory, tmp_path, dirs_exist_ok=True)
    later = [path.parent for path in tmp_path.glob("pbt_seed_0/*/checkpoint_*/member.pt")
             if torch.load(path, weights_only=True)["step"] > 2 * INTERVAL]
    assert later and list(tmp_path.glob("pbt_seed_0/exploits/*_step_200.pt"))
    for path in later:
        shutil.rmtree(path)
    resumed = pbt_search(problem, CONFIG, seed=0, population=2, checkpoint_dir=tmp_path, identity="x")
    assert list(tmp_path.glob("pbt_seed_0_before_step_200"))
    assert decisions(resumed) == decisions(searched)  # the exploit at 200 once, not retaken nor lost
    assert resumed.history == searched.history
    assert resumed.final_val_acc == searched.final_val_acc and resumed.final_test_acc == searched.final_test_acc
    assert resumed.steps == 2 * CONFIG.epochs + 2 * INTERVAL  # the killed steps after 200 counted, and taken again


def test_a_member_whose_state_is_ahead_of_tunes_iteration_waits_for_it(problem, ray_runtime):
    """Tune's synchronous mode can let a source run on before its checkpoint for a decision is taken, so a copier
    can get a state a step interval ahead of its iteration. The member then takes no steps until Tune's iteration
    catches up: it must not finish early, which left the source paused forever, waiting for a decision."""
    from ray import tune

    from metadistill.pbt import _member_trainable

    member = tune.with_parameters(_member_trainable(tune), problem=problem, train_config=CONFIG, seed=0)(
        config={"member": 0, "resume_from": "", "lambda1": 0.5, "temperature": 2.0})
    assert [member.train()["student_step"] for _ in range(2)] == [INTERVAL, 2 * INTERVAL]
    saved = member.save()
    member.restore(saved.checkpoint.path)  # the state of step 200, labelled as Tune's iteration 0
    results = [member.train() for _ in range(3)]
    assert [(r["training_iteration"], r["student_step"], r["steps_taken"]) for r in results] == [
        (1, 2 * INTERVAL, 0), (2, 2 * INTERVAL, 0), (3, 3 * INTERVAL, INTERVAL)]
    assert [r["done"] for r in results] == [False, False, True]
    member.stop()


def test_a_search_whose_every_member_diverges_is_a_divergence_error(problem, ray_runtime, tmp_path, monkeypatch):
    x_train = problem.x_train.clone()
    x_train[0, 0] = float("nan")  # full-batch steps: every member's loss is not finite from the first step
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the members' checkpoints go
    with pytest.raises(DivergenceError, match="every pbt member diverged"):
        pbt_search(dataclasses.replace(problem, x_train=x_train), dataclasses.replace(CONFIG, epochs=INTERVAL), seed=2,
                   population=2)
    assert not list(tmp_path.glob("metadistill-pbt-*"))  # removed, though the search ended in an error


def test_a_members_own_error_reaches_the_caller_as_itself(problem, ray_runtime):
    """A member that fails (here: the user's data does not fit the student) raises the worker's own exception in
    the driver, not a wrapper whose message is Ray's whole traceback; that traceback stays in the chain."""
    from ray.exceptions import RayTaskError

    with pytest.raises(RuntimeError) as raised:
        pbt_search(dataclasses.replace(problem, x_train=problem.x_train[:, :1]), dataclasses.replace(CONFIG, epochs=10),
                   seed=2, population=2)
    error = raised.value
    assert "shapes cannot be multiplied" in str(error) and "ray::" not in str(error)
    assert not isinstance(error, RayTaskError) and isinstance(error.__cause__, RayTaskError)


def test_a_diverged_member_scores_zero_and_is_replaced_at_the_next_exploit(problem, ray_runtime):
    """Seed 2's members start at T = 0.40 and 5.13; a teacher logit of 3e38 is finite over T > 1 but not over
    T < 1, so only the first member's loss is not finite (from its first step)."""
    teacher_train = problem.teacher_train.clone()
    teacher_train[0, 0] = 3e38
    starts = [random_metaparameters([2, k]).temperature for k in range(2)]
    assert starts[0] < 1 < starts[1]
    searched = pbt_search(dataclasses.replace(problem, teacher_train=teacher_train), CONFIG, seed=2, population=2)
    diverged = searched.extra["divergences"]
    assert len(diverged) == 1 and diverged[0]["step"] == 0 and diverged[0]["lam"][1] == starts[0]
    first = [event for event in searched.extra["exploits"] if event["own_step"] == INTERVAL]
    assert len(first) == 1 and first[0]["trial"] == diverged[0]["trial"]  # the diverged member copied the other
    assert first[0]["copied_temperature"] == starts[1]
    assert first[0]["weights_loaded"] == first[0]["weights_saved"]
    assert not any(member["failed"] for member in searched.extra["members"])  # it trained on from the copy
    # the diverged member's steps count too (the exploit above was synchronous, at INTERVAL: none skipped)
    assert searched.steps == steps_taken(searched.extra, 2, CONFIG.epochs) == 2 * CONFIG.epochs
    assert math.isfinite(searched.final_val_acc) and searched.final_val_acc > 0.5


def test_pbt_runs_in_a_grid_and_is_recorded(ray_runtime, tmp_path):
    config = build_config("synthetic", ["epochs=200", "teacher_steps=500", "pbt_population=2"])
    results = run_experiment(config, ["pbt"], [0], tmp_path, quiet=True)
    record = results["pbt"][0]
    assert record["full_trainings"] == 2 and record["extra"]["population"] == 2
    # on a loaded machine Tune's synchronous mode once let a source run on before a copier's exploit (300 steps)
    assert record["steps"] == steps_taken(record["extra"], 2, 200)
    assert all(event["own_step"] % 100 == 0 for event in record["extra"]["exploits"])  # decisions at results
    history = (tmp_path / "synthetic" / "pbt" / "run_000" / "history.jsonl").read_text().splitlines()
    assert len(history) == 200
    assert not list((tmp_path / "synthetic" / "pbt").glob(".batch_*"))  # its Tune experiment is cleaned up


def test_pbt_settings_are_checked():
    with pytest.raises(ConfigError, match="pbt_population must be >= 2"):
        build_config("synthetic", ["pbt_population=1"])
    with pytest.raises(ConfigError, match="pbt_interval must be >= 0"):
        build_config("synthetic", ["pbt_interval=-1"])


def test_pbt_without_ray_is_one_clear_error(tmp_path, cli_without_ray):
    code, stderr = cli_without_ray(["run", "--dataset", "synthetic", "--method", "pbt", "--quiet", "--out",
                                    str(tmp_path)])
    assert (code, stderr) == (2, ["metadistill: error: method pbt needs ray: pip install 'metadistill[ray]'"])
    assert not list(tmp_path.glob("synthetic/pbt/run_*"))
