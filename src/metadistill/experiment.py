"""Runs of (dataset, method, seed) into run directories, skipping finished ones; the in-process executor."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .batched import Outcome, batchable, fit_batched
from .config import METHODS, NOT_IDENTITY, ConfigError, ExperimentConfig
from .data.vision import VisionData, load_vision
from .models import STUDENTS
from .records import load_finished, run_dir, save_run
from .search import hyperopt_search, hyperopt_search_batched
from .teacher import TeacherResult, get_teacher
from .train import DivergenceError, Problem, RunResult, fit


def load_problem(config: ExperimentConfig, progress: bool = True) -> tuple[Problem, dict[str, Any]]:
    """The dataset's Problem and facts about it (teacher accuracy) for the records."""
    if config.dataset == "synthetic":
        from .data.synthetic import synthetic_problem

        problem, teacher_acc = synthetic_problem(config.data_seed, config.teacher_steps, config.teacher_lr)
        return problem, {"teacher_test_acc": teacher_acc}
    data = load_vision_config(config)
    teacher = train_or_load_teacher(config, data, progress)
    problem = Problem(data.x_train, data.y_train, teacher.train_logits, data.x_val, data.y_val, data.x_test,
                      data.y_test, make_student=STUDENTS[config.dataset.removesuffix("-reduced")])
    return problem, {"teacher_test_acc": teacher.test_acc, "teacher_arch": teacher.arch}


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


def train_or_load_teacher(config: ExperimentConfig, data: VisionData, progress: bool = True) -> TeacherResult:
    """The dataset's teacher from the cache, trained first if the cache has none for this exact setup."""
    return get_teacher(data, config.teacher_arch, cache_dir(config) / "teachers", epochs=config.teacher_epochs,
                       lr=config.teacher_lr, batch_size=config.teacher_batch_size, seed=config.data_seed,
                       device=config.device, progress=progress)


def run_identity(config: ExperimentConfig, method: str, seed: int) -> dict[str, Any]:
    """What a run's result depends on; a finished run is reused only when this matches exactly."""
    identity = {**dataclasses.asdict(config), "method": method, "seed": seed}
    for key in NOT_IDENTITY:
        identity.pop(key)
    return identity


def run_one(config: ExperimentConfig, problem: Problem, method: str, seed: int,
            progress: Callable[[int, int], None] | None = None) -> RunResult:
    train_config = config.train_config()
    if method == "hyperopt":
        return hyperopt_search(problem, train_config, seed, config.hyperopt_trials, progress)
    return fit(problem, config.strategy(method), train_config, seed, progress)


def run_batch(config: ExperimentConfig, problem: Problem, method: str, seeds: list[int], checkpoint_dir: Path,
              progress: Callable[[int, int], None] | None = None) -> list[Outcome]:
    """The runs `seeds` of `method` trained together (see batched.fit_batched), checkpointing into
    `checkpoint_dir` so that an interrupted batch resumes."""
    train_config = config.train_config()
    identity = [run_identity(config, method, seed) for seed in seeds]
    if method == "hyperopt":
        return hyperopt_search_batched(problem, train_config, seeds, config.hyperopt_trials, progress,
                                       checkpoint_dir, identity)
    return fit_batched(problem, [config.strategy(method) for _ in seeds], train_config, seeds, progress,
                       checkpoint_dir / "train.ckpt", identity)


def run_experiment(config: ExperimentConfig, methods: list[str], seeds: list[int], out: Path,
                   quiet: bool = False, log: Callable[[str], None] = print) -> dict[str, list[dict]]:
    """Run every (method, seed) not yet finished under `out`; returns {method: [result, ...]} for all of them.

    The pending runs of a method train `config.batch_runs` at a time as one stacked computation where the
    student allows it (else one at a time). Each run's records are written as soon as its batch finishes
    and a batch in progress checkpoints every epoch, so an interrupted experiment resumes where it
    stopped when the same command is run again. A run that diverges raises DivergenceError after the
    other runs of its batch are saved.
    """
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if config.threads:
        torch.set_num_threads(config.threads)
    loaded: tuple[Problem, dict[str, Any]] | None = None
    results: dict[str, dict[int, dict]] = {}
    for method in methods:
        pending = []
        for seed in seeds:
            finished = load_finished(run_dir(out, config.dataset, method, seed), run_identity(config, method, seed))
            if finished is None:
                pending.append(seed)
            else:
                results.setdefault(method, {})[seed] = finished
        if not pending:
            continue
        if loaded is None:
            loaded = load_problem(config, progress=not quiet)
        problem, facts = loaded
        size = config.batch_runs if batchable(problem, config.train_config()) else 1
        for start in range(0, len(pending), size):
            group = pending[start:start + size]
            label = f"run {group[0]}" if len(group) == 1 else f"runs {group[0]}-{group[-1]}"
            with tqdm(total=0, desc=f"{config.dataset} {method} {label}", unit="step", disable=quiet,
                      leave=False, dynamic_ncols=True, mininterval=0.5) as bar:
                def progress(done: int, total: int, bar: tqdm = bar) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                checkpoint_dir = Path(out) / config.dataset / method / f".batch_{group[0]:03d}-{group[-1]:03d}"
                if len(group) == 1:
                    outcomes: list[Outcome] = [run_one(config, problem, method, group[0], progress)]
                else:
                    outcomes = run_batch(config, problem, method, group, checkpoint_dir, progress)
            errors = []
            for seed, outcome in zip(group, outcomes):
                if isinstance(outcome, DivergenceError):
                    errors.append(f"{method} run {seed}: {outcome}")
                    continue
                result: RunResult = outcome
                result.extra.update(facts, torch=torch.__version__, threads=torch.get_num_threads())
                identity = run_identity(config, method, seed)
                results.setdefault(method, {})[seed] = save_run(run_dir(out, config.dataset, method, seed), identity,
                                                                result)
                if not quiet:
                    log(f"{config.dataset} {method} run {seed}: test acc {result.final_test_acc:.4f}, "
                        f"lambda1 {result.final_lambda1:.3f}, T {result.final_temperature:.3f}, "
                        f"{result.wall_s:.1f} s")
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            if errors:
                raise DivergenceError("; ".join(errors))
    return {method: [by_seed[seed] for seed in sorted(by_seed)] for method, by_seed in results.items()}
