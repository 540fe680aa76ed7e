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

from .config import METHODS, NOT_IDENTITY, ConfigError, ExperimentConfig
from .data.vision import VisionData, load_vision
from .engine import Outcome, batchable, fit_batched
from .models import STUDENTS
from .problem import Problem
from .records import load_finished, run_dir, save_run
from .results import DivergenceError, RunResult
from .search import hyperopt_search_batched
from .teacher import TeacherResult, get_teacher

EXECUTORS = ("local", "ray")


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


def run_batch(config: ExperimentConfig, problem: Problem, method: str, seeds: list[int], checkpoint_dir: Path,
              progress: Callable[[int, int], None] | None = None) -> list[Outcome]:
    """The runs `seeds` of `method` trained together (see engine.train_runs), checkpointing into
    `checkpoint_dir` so that an interrupted batch resumes."""
    train_config = config.train_config()
    identity = [run_identity(config, method, seed) for seed in seeds]
    if method == "hyperopt":
        return hyperopt_search_batched(problem, train_config, seeds, config.hyperopt_trials, progress,
                                       checkpoint_dir, identity)
    return fit_batched(problem, [config.strategy(method) for _ in seeds], train_config, seeds, progress,
                       checkpoint_dir / "train.ckpt", identity)


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


def run_task(config: ExperimentConfig, problem: Problem, task: Task, out: Path,
             progress: Callable[[int, int], None] | None = None) -> list[Outcome]:
    """Train the task's runs (checkpointing under `out`); outcome per seed: RunResult or DivergenceError."""
    return run_batch(config, problem, task.method, task.seeds, task.checkpoint_dir(out, config.dataset), progress)


def finish_task(config: ExperimentConfig, task: Task, outcomes: list[Outcome], facts: dict[str, Any], out: Path,
                quiet: bool, log: Callable[[str], None]) -> tuple[dict[int, dict], list[str]]:
    """Save the task's finished runs (records written by this process only) and drop its checkpoints;
    returns ({seed: record}, divergence messages)."""
    saved, errors = {}, []
    for seed, outcome in zip(task.seeds, outcomes):
        if isinstance(outcome, DivergenceError):
            errors.append(f"{task.method} run {seed}: {outcome}")
            continue
        result: RunResult = outcome
        result.extra = {**facts, **result.extra}
        result.extra.setdefault("torch", torch.__version__)
        result.extra.setdefault("threads", torch.get_num_threads())
        identity = run_identity(config, task.method, seed)
        saved[seed] = save_run(run_dir(out, config.dataset, task.method, seed), identity, result)
        if not quiet:
            ranks = f" on {result.extra['world_size']} ranks" if "world_size" in result.extra else ""
            log(f"{config.dataset} {task.method} run {seed}{ranks}: test acc {result.final_test_acc:.4f}, "
                f"lambda1 {result.final_lambda1:.3f}, T {result.final_temperature:.3f}, {result.wall_s:.1f} s")
    shutil.rmtree(task.checkpoint_dir(out, config.dataset), ignore_errors=True)
    return saved, errors


def pending_runs(config: ExperimentConfig, methods: list[str], seeds: list[int], out: Path
                 ) -> tuple[dict[str, list[int]], dict[str, dict[int, dict]]]:
    """The seeds still to run per method (finished runs are skipped) and the finished runs' records."""
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    pending: dict[str, list[int]] = {}
    finished: dict[str, dict[int, dict]] = {}
    for method in methods:
        for seed in seeds:
            record = load_finished(run_dir(out, config.dataset, method, seed), run_identity(config, method, seed))
            if record is None:
                pending.setdefault(method, []).append(seed)
            else:
                finished.setdefault(method, {})[seed] = record
    return pending, finished


def group_tasks(pending: dict[str, list[int]], batch_size: int) -> list[Task]:
    """The pending runs of each method, `batch_size` to a task."""
    return [Task(method, seeds[i:i + batch_size]) for method, seeds in pending.items()
            for i in range(0, len(seeds), batch_size)]


def batch_size_for(config: ExperimentConfig, problem: Problem) -> int:
    """config.batch_runs where the student can be stacked, else 1."""
    return config.batch_runs if batchable(problem, config.train_config()) else 1


def run_experiment(config: ExperimentConfig, methods: list[str], seeds: list[int], out: Path,
                   quiet: bool = False, log: Callable[[str], None] = print, executor: str = "local",
                   ray_address: str | None = None, ray_num_cpus: int | None = None) -> dict[str, list[dict]]:
    """Run every (method, seed) not yet finished under `out`; returns {method: [result, ...]} for all of them.

    The pending runs of a method train `config.batch_runs` at a time as one stacked computation where the
    student allows it (else one at a time); each such task runs in this process (executor "local") or as
    a Ray task (executor "ray", see ray_executor). Each run's records are written as soon as its task
    finishes and a batch in progress checkpoints every epoch, so an interrupted experiment resumes where
    it stopped when the same command is run again. A run that diverges raises DivergenceError after the
    other runs are saved.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if config.threads:
        torch.set_num_threads(config.threads)
    pending, results = pending_runs(config, methods, seeds, out)
    problem: Problem | None = None
    facts: dict[str, Any] = {}
    tasks: list[Task] = []
    if pending:
        # Loaded here even for Ray: an image dataset's teacher is then trained once, into the cache the
        # tasks read it from.
        problem, facts = load_problem(config, progress=not quiet)
        tasks = group_tasks(pending, batch_size_for(config, problem))
    errors: list[str] = []
    if executor == "ray":
        from .ray_executor import run_on_ray

        for task, outcomes in run_on_ray(config, tasks, out, ray_address, ray_num_cpus, quiet, log):
            saved, failed = finish_task(config, task, outcomes, facts, out, quiet, log)
            results.setdefault(task.method, {}).update(saved)
            errors += failed
    else:
        for task in tasks:
            assert problem is not None
            with tqdm(total=0, desc=f"{config.dataset} {task.method} {task.label}", unit="step", disable=quiet,
                      leave=False, dynamic_ncols=True, mininterval=0.5) as bar:
                def progress(done: int, total: int, bar: tqdm = bar) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                outcomes = run_task(config, problem, task, out, progress)
            saved, failed = finish_task(config, task, outcomes, facts, out, quiet, log)
            results.setdefault(task.method, {}).update(saved)
            if failed:
                raise DivergenceError("; ".join(failed))
    if errors:
        raise DivergenceError("; ".join(errors))
    return {method: [by_seed[seed] for seed in sorted(by_seed)] for method in methods
            if (by_seed := results.get(method))}


def run_ddp(config: ExperimentConfig, method: str, seeds: list[int], out: Path, quiet: bool = False,
            log: Callable[[str], None] = print) -> dict[str, list[dict]] | None:
    """The runs of `method`, each one student trained data-parallel by every rank of a torchrun launch
    (see ddp.fit_ddp). Rank 0 writes the records and gets {method: [result, ...]}; other ranks get None."""
    if method == "hyperopt":
        raise ConfigError("--ddp trains one student with a metaparameter strategy; hyperopt is not supported")
    if config.hypergrad_method != "jvp":
        raise ConfigError("--ddp computes hypergradients by the jvp method only (DDP cannot double-backward)")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError("--ddp runs under torchrun, e.g. torchrun --nproc-per-node 2 -m metadistill.cli run "
                          "--dataset D --method M --ddp")
    import torch.distributed as dist

    from .ddp import fit_ddp, init_from_env

    if config.threads:
        torch.set_num_threads(config.threads)
    rank, _ = init_from_env(config.device)
    pending, finished = pending_runs(config, [method], seeds, out)
    results: dict[int, dict] = finished.get(method, {})
    loaded: tuple[Problem, dict[str, Any]] | None = None
    for seed in pending.get(method, []):
        if loaded is None:
            if rank != 0:
                dist.barrier()  # rank 0 trains the teacher into the cache first
            loaded = load_problem(config, progress=not quiet and rank == 0)
            if rank == 0:
                dist.barrier()
        problem, facts = loaded
        result = fit_ddp(problem, config.strategy(method), config.train_config(), seed)
        if rank == 0:
            saved, _ = finish_task(config, Task(method, [seed]), [result], facts, out, quiet, log)
            results.update(saved)
        dist.barrier()
    return {method: [results[seed] for seed in sorted(results)]} if rank == 0 else None
