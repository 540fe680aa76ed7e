"""A task of an experiment: loading its problem (data, cached teacher), the identity of its runs, training them.

Shared by the in-process executor (experiment.py), its pool of worker processes (processes.py) and the Ray
executor (ray_executor.py), which all sit above this module.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import NOT_IDENTITY, ExperimentConfig
from .data.vision import VisionData, load_vision
from .engine import Outcome, fit_batched
from .identity import code_version
from .models import STUDENTS
from .optuna_search import optuna_search
from .pbt import pbt_search
from .problem import Problem
from .results import DivergenceError
from .runtime import keep_freed_memory
from .search import hyperopt_search_batched
from .teacher import TeacherResult, entry_name, get_teacher


def load_vision_config(config: ExperimentConfig) -> VisionData:
    """The image dataset of `config`, cut to `subset` when set."""
    data = load_vision(config.dataset, config.data_dir or None, config.download)
    if config.subset:
        sizes = {"train": config.subset, "val": max(config.subset // 4, 1), "test": max(config.subset // 2, 1)}
        data = VisionData(data.name, data.x_train[:sizes["train"]], data.y_train[:sizes["train"]],
                          data.x_val[:sizes["val"]], data.y_val[:sizes["val"]],
                          data.x_test[:sizes["test"]], data.y_test[:sizes["test"]], data.classes)
    return data


def cache_dir(config: ExperimentConfig) -> Path:
    return Path(config.cache_dir or os.environ.get("METADISTILL_CACHE") or Path.home() / ".cache" / "metadistill")


def _teacher_settings(config: ExperimentConfig) -> dict[str, Any]:
    return {"epochs": config.teacher_epochs, "lr": config.teacher_lr, "batch_size": config.teacher_batch_size,
            "seed": config.data_seed}


def train_or_load_teacher(config: ExperimentConfig, data: VisionData, progress: bool = True) -> TeacherResult:
    """The dataset's teacher from the cache, trained first if the cache has none for this exact setup."""
    return get_teacher(data, config.teacher_arch, cache_dir(config) / "teachers", device=config.device,
                       progress=progress, **_teacher_settings(config))


def context_of(config: ExperimentConfig, data: VisionData | None) -> dict[str, Any]:
    """What every run's identity holds beyond its settings: the code version and, for an image dataset, the
    teacher's cache entry (which names its data, architecture and training exactly)."""
    if data is None:
        return {"code": code_version()}
    return {"code": code_version(), "teacher": entry_name(data, config.teacher_arch, **_teacher_settings(config))}


def load_problem(config: ExperimentConfig, progress: bool = True, data: VisionData | None = None
                 ) -> tuple[Problem, dict[str, Any]]:
    """The dataset's Problem and facts about it for the records (teacher accuracy; for an image dataset the
    teacher's cache entry). `data`: the image dataset, if already loaded."""
    if config.dataset == "synthetic":
        from .data.synthetic import synthetic_problem

        problem, teacher_acc = synthetic_problem(config.data_seed, config.teacher_steps, config.teacher_lr)
        return problem, {"teacher_test_acc": teacher_acc}
    data = data if data is not None else load_vision_config(config)
    teacher = train_or_load_teacher(config, data, progress)
    problem = Problem(data.x_train, data.y_train, teacher.train_logits, data.x_val, data.y_val, data.x_test,
                      data.y_test, make_student=STUDENTS[config.dataset.removesuffix("-reduced")])
    return problem, {"teacher_test_acc": teacher.test_acc, "teacher_arch": teacher.arch,
                     "teacher_key": teacher.path.name}


def run_identity(config: ExperimentConfig, method: str, seed: int, context: dict[str, Any]) -> dict[str, Any]:
    """What a run's result depends on, and nothing else: its settings (those its method uses), method, seed,
    and the `context` (code version, teacher, DDP world size); a recorded run is reused only when this
    matches exactly."""
    ignored = set(NOT_IDENTITY) | set(config.ignored(method))
    identity = {key: value for key, value in dataclasses.asdict(config).items() if key not in ignored}
    return {**identity, "method": method, "seed": seed, **context}


def _outcome(search: Callable[[], Outcome]) -> Outcome:
    """A search's result, or its DivergenceError as the outcome (the grid records it and goes on)."""
    try:
        return search()
    except DivergenceError as error:
        return error


@dataclasses.dataclass
class Task:
    """One unit of work: the pending runs `seeds` of `method`, trained together (one at a time if alone)."""

    method: str
    seeds: list[int]

    @property
    def label(self) -> str:
        return f"run {self.seeds[0]}" if len(self.seeds) == 1 else f"runs {self.seeds[0]}-{self.seeds[-1]}"

    def checkpoint_dir(self, out: Path, dataset: str) -> Path:
        """Where a batch of runs keeps its checkpoints while it trains."""
        return Path(out) / dataset / self.method / f".batch_{self.seeds[0]:03d}-{self.seeds[-1]:03d}"


def run_task(config: ExperimentConfig, problem: Problem, task: Task, out: Path, context: dict[str, Any],
             progress: Callable[[int, int], None] | None = None, ray_address: str | None = None,
             ray_num_cpus: int | None = None) -> list[Outcome]:
    """Train the task's runs together (see engine.train_runs), checkpointing under `out` so that an
    interrupted task resumes; outcome per seed: RunResult or DivergenceError. The pbt method runs its
    population on the Ray runtime at `ray_address` (default: a local one of `ray_num_cpus` CPUs)."""
    train_config = config.train_config()
    checkpoint_dir = task.checkpoint_dir(out, config.dataset)
    identity = [run_identity(config, task.method, seed, context) for seed in task.seeds]
    if task.method == "hyperopt":
        return hyperopt_search_batched(problem, train_config, task.seeds, config.hyperopt_trials, progress,
                                       checkpoint_dir, identity)
    if task.method == "optuna":  # pruned trials end at different steps: one run, one trial at a time
        return [_outcome(functools.partial(optuna_search, problem, train_config, seed, config.optuna_budget,
                                           config.optuna_pruner, progress, checkpoint_dir / f"seed_{seed}",
                                           identity[i])) for i, seed in enumerate(task.seeds)]
    if task.method == "pbt":  # (run_experiment holds one Ray runtime for all of them)
        return [_outcome(functools.partial(pbt_search, problem, train_config, seed, config.pbt_population,
                                           config.pbt_interval, ray_address, ray_num_cpus, config.threads or 1,
                                           checkpoint_dir / f"seed_{seed}", identity[i], progress))
                for i, seed in enumerate(task.seeds)]
    return fit_batched(problem, [config.strategy(task.method) for _ in task.seeds], train_config, task.seeds,
                       progress, checkpoint_dir / "train.ckpt", identity)


def run_task_alone(config_values: dict, method: str, seeds: list[int], out: str, executor: str) -> list[Outcome]:
    """`run_task` in a process of its own (a Ray worker, or a worker process of the local executor): load the
    problem (the data, the teacher from the cache the driver filled) and train the task's runs. Their records
    say which executor ran them, with the process's torch version and threads."""
    keep_freed_memory()
    config = ExperimentConfig(**config_values)
    if config.threads:
        torch.set_num_threads(config.threads)
    data = None if config.dataset == "synthetic" else load_vision_config(config)
    problem, _ = load_problem(config, progress=False, data=data)
    return tagged(run_task(config, problem, Task(method, seeds), Path(out), context_of(config, data)), executor)


def tagged(outcomes: list[Outcome], executor: str) -> list[Outcome]:
    """`outcomes` with the facts of the process that trained them (executor, torch version, threads) in each
    finished run's extra."""
    for outcome in outcomes:
        if not isinstance(outcome, Exception):
            outcome.extra.update(torch=torch.__version__, threads=torch.get_num_threads(), executor=executor)
    return outcomes
