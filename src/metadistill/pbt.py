"""The PBT baseline: Ray Tune's PopulationBasedTraining over the student's training, scored on validation.

A population of `population` members trains the student of the run: every member starts from the run's seed
(the same initial weights and data order as every other method's run of that seed) with lambda of its own,
drawn like the random method's draw (member k of run s: `random_metaparameters([s, k])`). Every `interval`
student steps (default: the schedule's evaluation interval, an epoch on the image datasets) each member is
evaluated on validation, and Ray Tune's PopulationBasedTraining scheduler, in its synchronous mode (decisions
are taken when every member is at the same step), lets the bottom quantile exploit the top one: copy its whole
training state (weights, optimizer, lr schedule, data position, lambda and lambda history) and explore from
there (PBT's own explore: lambda1 and T each multiplied by 0.8 or 1.2, or resampled from the space with
probability 0.25; then projected onto the bounds). A member whose training diverged scores 0 and is replaced
at the next exploit; each divergence (member, step, lambda, message) is kept in the record's
extra["divergences"].

The run's result is the member with the best validation accuracy at the end (the test set takes no part in
any choice); its lambda trajectory is its lineage, since a member that copies another copies its history. The
cost counts every student step any member took: `population` trainings' worth.

Equal seeds make equal searches: the starting draws and the explore are drawn from generators of the run's own,
and the synchronous scheduler decides with every member at the same step, whatever order their results come
in. (Tune's synchronous mode has, rarely and on a loaded machine, let a source run on before its checkpoint for
a decision was taken; its copier then skips to that later state, recorded as the exploit's `own_step`, and
takes no steps until Tune's iterations catch up, so that it does not finish early.) (With more than one
member in the top quarter, population >= 5, which of them a member copies is Tune's draw from Python's global
generator, which is seeded for the search but which Ray's own threads may also draw from.)

An interrupted search (Ctrl-C, or a killed process) goes on, when run again with the same `checkpoint_dir` and
identity, from the last step at which every member has a checkpoint. Every decision step
keeps one decision: where the exploits of the decision there had been carried out, the copiers go on from their
states just after them (kept for this); where not, every member first reports its state there without a step,
and the decision is taken again. The steps and wall time before the interruption are counted; the explore draws
after it differ from an uninterrupted run's.

Runs on the local Ray runtime (started here unless one is running) or on the cluster at `address` (then
`checkpoint_dir` must be on a file system every node sees: Tune keeps the members' checkpoints there);
members declare `threads` CPUs each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .engine import Data, Engine, Parallel
from .files import write_atomic
from .identity import tensor_fingerprint
from .meta import LAMBDA1_BOUNDS, TEMPERATURE_BOUNDS, Metaparameters
from .problem import Loaders, steps_per_epoch
from .results import DivergenceError, RunResult
from .runtime import ray_runtime, require_ray, worker_error
from .strategies import Fixed, random_metaparameters
from .train import Schedule, TrainConfig

STATE_FILE = "member.pt"
COST_FILE = "cost.json"
EXPLOITS = "exploits"  # in the experiment's directory: each copier's state just after its exploit
RESAMPLE_PROBABILITY = 0.25  # Tune's defaults
PERTURBATION_FACTORS = (0.8, 1.2)


def require_tune() -> Any:
    """The ray.tune module, or ImportError saying how to install it."""
    require_ray("method pbt")
    try:
        from ray import tune
    except ImportError:
        raise ImportError("method pbt needs Ray Tune: pip install 'metadistill[ray]'") from None
    return tune


def weights_digest(model: nn.Module) -> str:
    """A short digest of every tensor of the model's state (exact: any changed element changes it)."""
    prints = [[name, tensor_fingerprint(value)] for name, value in model.state_dict().items()]
    return hashlib.sha256(json.dumps(prints, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _lam(config: dict) -> Metaparameters:
    return Metaparameters.clamped(config["lambda1"], config["temperature"])


def _explorer(seed: int) -> Callable[[dict], dict]:
    """PBT's explore, drawn from a generator of the run's own: lambda1 and T each resampled from the search
    space (probability 0.25) or multiplied by 0.8 or 1.2, then projected onto the bounds. (Tune's built-in
    explore does the same from the process-wide generators, which Ray's own threads also draw from.)"""
    rng = np.random.default_rng([seed, 1])

    def explore(config: dict) -> dict:
        lambda1, temperature = config["lambda1"], config["temperature"]
        if rng.random() < RESAMPLE_PROBABILITY:
            lambda1 = rng.uniform(*LAMBDA1_BOUNDS)
        else:
            lambda1 *= rng.choice(PERTURBATION_FACTORS)
        if rng.random() < RESAMPLE_PROBABILITY:
            temperature = 10.0 ** rng.uniform(*np.log10(TEMPERATURE_BOUNDS))
        else:
            temperature *= rng.choice(PERTURBATION_FACTORS)
        lam = Metaparameters.clamped(float(lambda1), float(temperature))
        return {**config, "lambda1": lam.lambda1, "temperature": lam.temperature}

    return explore


def _member_trainable(tune: Any) -> type:
    """The Tune Trainable of one member (a class made here, so that this module imports without ray)."""

    class PbtMember(tune.Trainable):
        def setup(self, config: dict, problem: Data | None = None, train_config: TrainConfig | None = None,
                  seed: int = 0, threads: int = 1, exploits: str = "", base: int = 0) -> None:
            torch.set_num_threads(threads)
            self.problem, self.train_config, self.seed, self.exploits = problem, train_config, seed, exploits
            self.base = base  # the student step of Tune's iteration 0
            self._fresh(config)

        def _fresh(self, config: dict) -> None:
            assert self.problem is not None and self.train_config is not None
            # a member's lambda is fixed between decisions; _set changes it at an exploit
            self.engine = Engine(self.problem, [Fixed(_lam(config), "pbt")], self.train_config, [self.seed],
                                 Parallel())
            self.next_step, self.lineage, self.exploited = 0, [], ""
            if config.get("resume_from"):  # an interrupted search: this member's last common checkpoint
                self._load(config["resume_from"])

        def _load(self, path: str | Path) -> dict:
            """The engine's and lineage's state from a member's checkpoint file; returns the state."""
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.next_step = self.engine.load_state_dict(state)
            self.lineage = list(state["lineage"])
            if "exploit" in state:  # a copier's state just after its exploit, resumed: the exploit is reported
                self.exploited = json.dumps(state["exploit"])
            return state

        def step(self) -> dict:
            engine, run = self.engine, self.engine.runs[0]
            # Tune's iteration k ends at student step base + k x interval, whatever the state reached: a state
            # copied from a source that had run on (Tune's synchronous mode does not prevent it) takes fewer steps,
            # none if it is at that step already, so the members stay in step with Tune's iterations (a copier
            # that finished early would leave the source paused, waiting for a decision that never comes)
            start = self.next_step
            end = min(max(start, self.base + (self.iteration + 1) * engine.schedule.eval_every),
                      engine.schedule.total_steps)
            for step in range(start, end):
                engine.iterate(step)
            engine.steps_done = self.next_step = end
            failed = run.failed is not None
            exploited, self.exploited = self.exploited, ""
            return {"val_acc": 0.0 if failed else run.evaluations.points[-1]["val_acc"], "steps_taken": end - start,
                    "student_step": end, "failed": failed, "done": end == engine.schedule.total_steps,
                    "exploited": exploited, "failure": json.dumps({"trial": self.trial_id, **run.failed}) if failed
                    else ""}

        def _state(self) -> dict:
            return {**self.engine.state_dict(self.next_step - 1), "trial": self.trial_id, "lineage": self.lineage,
                    "weights": weights_digest(self.engine.model)}

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            torch.save(self._state(), Path(checkpoint_dir) / STATE_FILE)

        def load_checkpoint(self, checkpoint_dir: str) -> None:
            self.exploited = ""  # a restore: the member has reported since it resumed
            state = self._load(Path(checkpoint_dir) / STATE_FILE)
            lam = _lam(self.config)
            if state["trial"] != self.trial_id:  # an exploit: this member goes on from another's state
                self.lineage.append({"step": self.next_step, "trial": self.trial_id, "copied": state["trial"],
                                     "copied_lambda1": state["runs"][0]["lam"][0],
                                     "copied_temperature": state["runs"][0]["lam"][1],
                                     "lambda1": lam.lambda1, "temperature": lam.temperature,
                                     "weights_saved": state["weights"],
                                     "weights_loaded": weights_digest(self.engine.model)})
                self.exploited = json.dumps(self.lineage[-1])  # reported with the next result
            self._set(lam)
            if self.exploited and self.exploits:  # kept, so that a search interrupted before this member's next
                # checkpoint goes on from the exploit (its checkpoint at this step is from before it)
                buffer = io.BytesIO()
                torch.save({**self._state(), "exploit": self.lineage[-1]}, buffer)
                write_atomic(Path(self.exploits) / f"{self.trial_id}_step_{self.next_step}.pt", buffer.getvalue())

        def reset_config(self, new_config: dict) -> bool:
            self._fresh(new_config)  # a reused actor starts clean; a restore then loads the member's state
            return True

        def _set(self, lam: Metaparameters) -> None:
            run = self.engine.runs[0]
            run.lam = run.strategy.lam = lam

    return PbtMember


def _cost_callback(tune: Any, path: Path, progress: Callable[[int], None] | None) -> Any:
    """A driver-side callback that sums every member's steps, the wall time, every exploit and every divergence
    (a member's first non-finite loss since its last start or exploit), kept in `path` so that a resumed search
    adds on. Each exploit gets `own_step`, the step the copier had reached when it was replaced (its result
    before the one that reports the exploit): equal to `step` in a synchronous decision. Tune's synchronous
    mode does not guarantee it; on a loaded machine a source has been seen to run on to its next result first,
    and the copier then went on from that later state, skipping `step - own_step` steps (not counted: the cost
    is the steps taken)."""

    class Cost(tune.Callback):
        def __init__(self) -> None:
            saved = json.loads(path.read_text()) if path.exists() else {"steps": 0, "wall_s": 0.0, "exploits": []}
            self.steps, self.earlier_wall, self.exploits = saved["steps"], saved["wall_s"], saved["exploits"]
            self.divergences = saved.get("divergences", [])
            self.reached: dict[str, int] = {}  # each trial's step at its last result
            self.started = time.perf_counter()

        def wall(self) -> float:
            return self.earlier_wall + time.perf_counter() - self.started

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            self.steps += int(result["steps_taken"])
            exploit = json.loads(result["exploited"]) if result.get("exploited") else None
            if exploit is not None and exploit not in (  # a resumed copier reports its exploit again
                    {key: value for key, value in event.items() if key != "own_step"} for event in self.exploits):
                # (no earlier result: a copier resumed from its state just after the exploit; the search went on
                # from the step where every member has a checkpoint of its own, so it had reached that step)
                self.exploits.append({**exploit, "own_step": self.reached.get(trial.trial_id, exploit["step"])})
            self.reached[trial.trial_id] = int(result["student_step"])
            failure = json.loads(result["failure"]) if result.get("failure") else None
            if failure is not None and failure not in self.divergences:  # reported again until it is replaced
                self.divergences.append(failure)
            write_atomic(path, json.dumps({"steps": self.steps, "wall_s": self.wall(), "exploits": self.exploits,
                                           "divergences": self.divergences}))
            if progress is not None:
                progress(self.steps)

    return Cost()


@contextlib.contextmanager
def _seeded_and_quiet(seed: int) -> Iterator[None]:
    """Python's and NumPy's global generators seeded for Tune's choices, and Tune's loggers quiet but for
    errors (a member's restore warns that its log files have not been written yet); all restored on leaving."""
    saved_random, saved_numpy = random.getstate(), np.random.get_state()
    tune_logger = logging.getLogger("ray.tune")
    saved_level = tune_logger.level
    random.seed(seed)
    np.random.seed(seed % 2**32)
    tune_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        random.setstate(saved_random)
        np.random.set_state(saved_numpy)
        tune_logger.setLevel(saved_level)


def _load_member_state(path: Path) -> tuple[int, str, Metaparameters] | None:
    """(step, trial, lambda) of a member's state file; None for a torn or foreign file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return int(state["step"]), str(state["trial"]), Metaparameters(*state["runs"][0]["lam"])
    except Exception:  # noqa: BLE001 - a torn or foreign file is not a state to go on from
        return None


def _last_common_checkpoints(experiment: Path, population: int) -> tuple[int, list[tuple[str, Metaparameters]]] | None:
    """Where an interrupted search goes on from: the last step at which every member has a state, and each
    member's state file there (relative to `experiment`) with its lambda; None when there is none. A member's
    states are its checkpoints and, where it exploited, its state just after the exploit, which replaces the
    checkpoint from before it (Tune saves none for a copier that reported last)."""
    after_exploits: dict[str, dict[int, tuple[str, Metaparameters]]] = {}
    for path in (experiment / EXPLOITS).glob("*.pt"):
        if (loaded := _load_member_state(path)) is not None:
            step, trial_id, lam = loaded
            after_exploits.setdefault(trial_id, {})[step] = (str(path.relative_to(experiment)), lam)
    by_member: dict[int, dict[int, tuple[str, Metaparameters]]] = {}
    members = [path for path in experiment.glob("*") if path.is_dir() and path.name != EXPLOITS]
    for member, trial in enumerate(sorted(members)):  # exchangeable: trial k of the earlier attempt is slot k
        found = {}
        for path in trial.glob(f"checkpoint_*/{STATE_FILE}"):
            if (loaded := _load_member_state(path)) is not None:
                found[loaded[0]] = (str(path.relative_to(experiment)), loaded[2])
        for trial_id, states in after_exploits.items():
            if f"_{trial_id}_" in trial.name:  # Tune names a trial's directory <trainable>_<trial id>_<tag>...
                found.update(states)
        by_member[member] = found
    if sorted(by_member) != list(range(population)):
        return None
    common = set.intersection(*(set(found) for found in by_member.values())) - {0}
    if not common:
        return None
    step = max(common)
    return step, [by_member[member][step] for member in range(population)]


def pbt_search(problem: Data, config: TrainConfig, seed: int, population: int = 4, interval: int = 0,
               address: str | None = None, num_cpus: int | None = None, threads: int = 1,
               checkpoint_dir: Path | None = None, identity: Any = None,
               progress: Callable[[int, int], None] | None = None) -> RunResult:
    """The PBT search of one run (see the module docstring); its RunResult is the best member's training at the
    end, with the steps of every member in `steps` and the population and exploits in extra. With
    `checkpoint_dir`, an interrupted search of the same `identity` resumes from its members' last checkpoints.
    `progress(steps, budget)`: every member's steps so far, against population x one training's steps."""
    if isinstance(problem, Loaders):
        raise ValueError("pbt copies members' states at its exploits, and runs from loaders cannot checkpoint (a "
                         "loader's position cannot be saved): pass a Problem (data in memory)")
    if population < 2:
        raise ValueError(f"pbt_population must be >= 2, got {population}")
    if interval < 0:
        raise ValueError(f"pbt_interval must be >= 0 (0: the evaluation interval), got {interval}")
    tune = require_tune()
    from ray.tune.schedulers import PopulationBasedTraining

    if checkpoint_dir is None:  # the members' checkpoints go to a directory removed however the search ends
        with tempfile.TemporaryDirectory(prefix="metadistill-pbt-", ignore_cleanup_errors=True) as temporary:
            return pbt_search(problem, config, seed, population, interval, address, num_cpus, threads,
                              Path(temporary), identity, progress)

    started = time.perf_counter()
    member_config = dataclasses.replace(config, eval_every=interval) if interval else config
    starts = [random_metaparameters([seed, k]) for k in range(population)]
    storage = Path(checkpoint_dir).resolve()
    name = f"pbt_seed_{seed}"
    key_path = storage / "identity.json"
    key = json.dumps({"identity": identity, "seed": seed, "population": population, "interval": interval,
                      "config": dataclasses.asdict(config)}, sort_keys=True, default=str)
    resumed = _last_common_checkpoints(storage / name, population) if (
        key_path.exists() and key_path.read_text() == key) else None
    if resumed is None:
        shutil.rmtree(storage / name, ignore_errors=True)
        (storage / COST_FILE).unlink(missing_ok=True)
        storage.mkdir(parents=True, exist_ok=True)
        write_atomic(key_path, key)
        starts_now, base = [("", lam) for lam in starts], 0
    else:  # the earlier attempt's checkpoints move aside; its members go on from them in a new experiment
        earlier = storage / f"{name}_before_step_{resumed[0]}"
        shutil.rmtree(earlier, ignore_errors=True)
        (storage / name).rename(earlier)
        starts_now = [(str(earlier / path), lam) for path, lam in resumed[1]]
        # a member with its state just after an exploit there: the decision was carried out; else it is taken
        # again, at Tune's first iteration, which then takes no step
        retake = not any(Path(path).parts[0] == EXPLOITS for path, _ in resumed[1])
        base = resumed[0] - (Schedule.of(member_config, steps_per_epoch(problem, config.batch_size)).eval_every
                             if retake else 0)
    trainable = tune.with_resources(
        tune.with_parameters(_member_trainable(tune), problem=problem, train_config=member_config, seed=seed,
                             threads=threads, exploits=str(storage / name / EXPLOITS), base=base), {"cpu": threads})
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration", metric="val_acc", mode="max", perturbation_interval=1, synch=True,
        custom_explore_fn=_explorer(seed if resumed is None else [seed, resumed[0]]))
    budget = population * Schedule.of(config, steps_per_epoch(problem, config.batch_size)).total_steps
    ticker = None if progress is None else (lambda steps: progress(steps, budget))
    cost = _cost_callback(tune, storage / COST_FILE, ticker)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    member_space = {"member": tune.grid_search(list(range(population))),
                    "resume_from": tune.sample_from(lambda config: starts_now[config["member"]][0]),
                    "lambda1": tune.sample_from(lambda config: starts_now[config["member"]][1].lambda1),
                    "temperature": tune.sample_from(lambda config: starts_now[config["member"]][1].temperature)}
    tuner = tune.Tuner(trainable, param_space=member_space,
                       tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True),
                       run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0, callbacks=[cost],
                                                 checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=True)))
    with ray_runtime(address, num_cpus, quiet=True, needs="method pbt"), _seeded_and_quiet(seed * 100003 + population):
        grid = tuner.fit()
    members = []
    for index in range(len(grid)):
        result = grid[index]
        if result.error is not None:
            raise worker_error(result.error)
        if not result.metrics.get("done"):  # Tune stops its trials on SIGINT and returns what it has
            raise KeyboardInterrupt(f"the pbt search of run {seed} was interrupted")
        state = torch.load(Path(result.checkpoint.path) / STATE_FILE, map_location="cpu", weights_only=True)
        members.append((result, state))
    finished = [(result, state) for result, state in members if not result.metrics["failed"]]
    if not finished:
        raise DivergenceError(f"every pbt member diverged (seed {seed})")
    best_result, best_state = max(finished, key=lambda pair: pair[0].metrics["val_acc"])  # first of equals
    engine = Engine(problem, [Fixed(Metaparameters(*best_state["runs"][0]["lam"]), "pbt")], member_config, [seed],
                    Parallel())
    engine.load_state_dict(best_state)
    outcome = engine.outcomes()[0]
    assert isinstance(outcome, RunResult)
    outcome.method = "pbt"
    outcome.steps = cost.steps
    outcome.full_trainings = population
    outcome.wall_s = cost.earlier_wall + time.perf_counter() - started
    outcome.extra = {**outcome.extra, "population": population, "interval": engine.schedule.eval_every,
                     "starts": [list(lam.as_tuple()) for lam in starts], "lineage": best_state["lineage"],
                     "exploits": cost.exploits, "divergences": cost.divergences,
                     "members": [{"final_val_acc": result.metrics["val_acc"], "failed": result.metrics["failed"],
                                  "lam": state["runs"][0]["lam"], "lineage": state["lineage"]}
                                 for result, state in members],
                     "final": "the member with the best validation accuracy at the end"}
    return outcome
