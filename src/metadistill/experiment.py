"""An experiment grid: the runs of (dataset, method, seed) into run directories, skipping recorded ones; the
in-process executor, the Ray executor's driver side, and torchrun's data-parallel runs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .config import METHODS, ONLINE_METHODS, SEARCH_METHODS, ConfigError, ExperimentConfig
from .engine import Outcome, batchable
from .problem import Problem
from .processes import default_workers, run_in_processes
from .records import Claims, load_finished, load_record, run_dir, save_diverged, save_run
from .results import DivergenceError, RunResult
from .runtime import ray_runtime
from .tasks import Task, context_of, load_problem, load_vision_config, run_identity, run_task

EXECUTORS = ("local", "ray")


@dataclass
class Grid:
    """The (method, seed) runs of one experiment and what is recorded of them under `out`."""

    config: ExperimentConfig
    out: Path
    context: dict[str, Any]
    pending: dict[str, list[int]] = field(default_factory=dict)
    finished: dict[str, dict[int, dict]] = field(default_factory=dict)
    diverged: list[str] = field(default_factory=list)  # one line per run that diverged (earlier or now)
    busy: list[str] = field(default_factory=list)  # the runs another process was training when this one came to them
    claims: Claims | None = None

    def scan(self, methods: list[str], seeds: list[int], retry_diverged: bool) -> Grid:
        """Sort every run into finished, diverged (not retrained unless `retry_diverged`) and pending."""
        for method in methods:
            if method not in METHODS:
                raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        for method in methods:
            for seed in seeds:
                record = load_record(self.directory(method, seed), self.identity(method, seed))
                if record is not None and record[0] == "finished":
                    self.finished.setdefault(method, {})[seed] = record[1]
                elif record is not None and not retry_diverged:
                    self.diverged.append(f"{method} run {seed} (recorded earlier; --retry-diverged retrains it): "
                                         f"{record[1]['message']}")
                else:
                    self.pending.setdefault(method, []).append(seed)
        return self

    def identity(self, method: str, seed: int) -> dict[str, Any]:
        return run_identity(self.config, method, seed, self.context)

    def directory(self, method: str, seed: int) -> Path:
        return run_dir(self.out, self.config.dataset, method, seed)

    def claim(self, task: Task) -> Task | None:
        """Claim the task's runs for this process just before they train (see records.Claims): a run another
        process holds is left to it (listed in `busy`), one recorded since the scan (by another process) is
        taken as recorded; returns the task of the others, None if none is left. `finish` releases them."""
        if self.claims is None:
            self.claims = Claims(self.out, self.config.dataset)
        held = self.claims.take(task.method, task.seeds)
        self.busy += [f"{task.method} run {seed}" for seed in held]
        todo = []
        for seed in (seed for seed in task.seeds if seed not in held):
            record = load_finished(self.directory(task.method, seed), self.identity(task.method, seed))
            if record is None:
                todo.append(seed)
            else:
                self.finished.setdefault(task.method, {})[seed] = record
                self.claims.release(task.method, [seed])
        return Task(task.method, todo) if todo else None

    def close(self) -> None:
        if self.claims is not None:
            self.claims.close()

    def tasks(self, batch_size: int) -> list[Task]:
        """The pending runs of each method, `batch_size` to a task (one to a task for the searches that run
        their own trainings, so that each run is recorded as soon as it finishes)."""
        return [Task(method, seeds[i:i + size]) for method, seeds in self.pending.items()
                for size in [1 if method in SEARCH_METHODS else batch_size] for i in range(0, len(seeds), size)]

    def finish(self, task: Task, outcomes: list[Outcome], facts: dict[str, Any], quiet: bool,
               log: Callable[[str], None]) -> None:
        """Record the task's runs, finished or diverged (by this process only), and drop its checkpoints."""
        for seed, outcome in zip(task.seeds, outcomes):
            directory, identity = self.directory(task.method, seed), self.identity(task.method, seed)
            if isinstance(outcome, DivergenceError):
                self.diverged.append(f"{task.method} run {seed}: {outcome}")
                save_diverged(directory, identity, {"method": task.method, "seed": seed, "message": str(outcome),
                                                    "step": outcome.step, "lam": outcome.lam,
                                                    "wall_s": outcome.wall_s})
                continue
            result: RunResult = outcome
            result.extra = {**facts, **result.extra}
            result.extra.setdefault("torch", torch.__version__)
            result.extra.setdefault("threads", torch.get_num_threads())
            result.extra["code"] = self.context["code"]
            self.finished.setdefault(task.method, {})[seed] = save_run(directory, identity, result)
            if not quiet:
                ranks = f" on {result.extra['world_size']} ranks" if "world_size" in result.extra else ""
                log(f"{self.config.dataset} {task.method} run {seed}{ranks}: test acc {result.final_test_acc:.4f}, "
                    f"lambda1 {result.final_lambda1:.3f}, T {result.final_temperature:.3f}, {result.wall_s:.1f} s")
        shutil.rmtree(task.checkpoint_dir(self.out, self.config.dataset), ignore_errors=True)
        if self.claims is not None:
            self.claims.release(task.method, task.seeds)

    def results(self, methods: list[str]) -> dict[str, list[dict]]:
        """{method: [result, ...]} of the finished runs; raises GridDiverged (with them) when any run diverged,
        else GridBusy when another process was training some of the runs."""
        results = {method: [by_seed[seed] for seed in sorted(by_seed)] for method in methods
                   if (by_seed := self.finished.get(method))}
        busy = (f"{', '.join(self.busy)} {'was' if len(self.busy) == 1 else 'were'} being trained by another "
                f"process, left to it") if self.busy else ""
        if self.diverged:
            raise GridDiverged("; ".join([*self.diverged, *([busy] if busy else [])]), results)
        if busy:
            raise GridBusy(f"{busy}; rerun the same command when it has finished to have every run", results)
        return results


class GridUnfinished(RuntimeError):
    """Some runs of a grid are not finished (diverged, or left to another process); every other run finished
    and is recorded (`results`)."""

    def __init__(self, message: str, results: dict[str, list[dict]]) -> None:
        super().__init__(message)
        self.results = results


class GridDiverged(GridUnfinished, DivergenceError):
    """Some runs of a grid diverged (and maybe some were left to another process)."""


class GridBusy(GridUnfinished):
    """Some runs of a grid were being trained by another process, and were left to it."""


def _local_progress(config: ExperimentConfig, task: Task, quiet: bool) -> tqdm:
    return tqdm(total=0, desc=f"{config.dataset} {task.method} {task.label}", unit="step", disable=quiet,
                leave=False, dynamic_ncols=True, mininterval=0.5)


def run_experiment(config: ExperimentConfig, methods: list[str], seeds: list[int], out: Path,
                   quiet: bool = False, log: Callable[[str], None] = print, executor: str = "local",
                   ray_address: str | None = None, ray_num_cpus: int | None = None,
                   retry_diverged: bool = False, workers: int | None = None) -> dict[str, list[dict]]:
    """Run every (method, seed) not yet recorded under `out`; returns {method: [result, ...]} for all of them.

    The pending runs of a method train `config.batch_runs` at a time as one stacked computation where the
    student allows it (else one at a time); each such task runs locally (executor "local": in this process,
    or `workers` tasks at a time in worker processes, see processes.py; default `default_workers`) or as
    a Ray task (executor "ray", see ray_executor). Each run's records are written as soon as its task
    finishes and a batch in progress checkpoints every epoch, so an interrupted experiment resumes where
    it stopped when the same command is run again. A run that diverges is recorded as diverged and the
    grid goes on; at the end, DivergenceError lists every diverged run (a rerun does not retrain them
    unless `retry_diverged`).
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if workers is not None and (workers < 1 or executor != "local"):
        raise ConfigError(f"workers is for the local executor and must be >= 1, got {workers} ({executor})")
    if config.threads:
        torch.set_num_threads(config.threads)
    data = None if config.dataset == "synthetic" else load_vision_config(config)
    grid = Grid(config, out, context_of(config, data)).scan(methods, seeds, retry_diverged)
    if not grid.pending:
        return grid.results(methods)
    # Loaded here even for Ray: an image dataset's teacher is then trained once, into the cache the tasks
    # read it from.
    problem, facts = load_problem(config, progress=not quiet, data=data)
    tasks = grid.tasks(config.batch_runs if batchable(problem, config.train_config()) else 1)
    others = [task for task in tasks if task.method != "pbt"]  # pbt's members are Ray actors already
    workers = default_workers(config) if workers is None else workers
    away = executor == "ray" or min(workers, len(others)) > 1  # `others` train in workers, not here
    with ExitStack() as stack:
        stack.callback(grid.close)
        if away:  # claimed now, waiting for a worker; the tasks trained here are claimed as each starts
            others = [claimed for task in others if (claimed := grid.claim(task)) is not None]
            tasks = [task for task in tasks if task.method == "pbt"]
        elsewhere = None
        if executor == "ray":
            from .ray_executor import ray_session, run_on_ray

            stack.enter_context(ray_session(ray_address, ray_num_cpus, quiet))  # pbt's members use it too
            elsewhere = run_on_ray(config, others, out, ray_address, ray_num_cpus, quiet, log)
        elif away:
            elsewhere = run_in_processes(config, problem, grid.context, others, out, workers, quiet)
        if elsewhere is not None:
            for task, outcomes in stack.enter_context(closing(elsewhere)):  # an error here stops its workers now
                grid.finish(task, outcomes, facts, quiet, log)
        if executor == "local" and any(task.method == "pbt" for task in tasks):  # one runtime for every search
            stack.enter_context(ray_runtime(ray_address, ray_num_cpus, quiet=True, needs="method pbt"))
        for task in filter(None, map(grid.claim, tasks)):
            with _local_progress(config, task, quiet) as bar:
                def progress(done: int, total: int, bar: tqdm = bar) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                outcomes = run_task(config, problem, task, out, grid.context, progress, ray_address, ray_num_cpus)
            grid.finish(task, outcomes, facts, quiet, log)
    return grid.results(methods)


def run_ddp(config: ExperimentConfig, method: str, seeds: list[int], out: Path, quiet: bool = False,
            log: Callable[[str], None] = print, retry_diverged: bool = False) -> dict[str, list[dict]] | None:
    """The runs of `method`, each one student trained data-parallel by every rank of a torchrun launch
    (see ddp.fit_ddp). Rank 0 writes the records and gets {method: [result, ...]}; other ranks get None.
    The world size is part of the runs' identity."""
    if method in ("hyperopt", *SEARCH_METHODS):
        raise ConfigError(f"--ddp trains one student with a metaparameter strategy; {method} is not supported")
    if config.hypergrad_method != "jvp":
        raise ConfigError("--ddp computes hypergradients by the jvp method only (DDP cannot double-backward)")
    if method in ONLINE_METHODS:
        raise ConfigError("--ddp computes the greedy hypergradient only; run the online methods without --ddp")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError("--ddp runs under torchrun, e.g. torchrun --nproc-per-node 2 -m metadistill.cli run "
                          "--dataset D --method M --ddp")
    import torch.distributed as dist

    from .ddp import fit_ddp, process_group

    if config.threads:
        torch.set_num_threads(config.threads)
    with process_group(config.device) as (rank, world):
        data = None if config.dataset == "synthetic" else load_vision_config(config)
        identity = {**context_of(config, data), "world_size": world}
        grid = Grid(config, out, identity).scan([method], seeds, retry_diverged)
        loaded: tuple[Problem, dict[str, Any]] | None = None
        for seed in grid.pending.get(method, []):
            if loaded is None:
                if rank != 0:
                    dist.barrier()  # rank 0 trains the teacher into the cache first
                loaded = load_problem(config, progress=not quiet and rank == 0, data=data)
                if rank == 0:
                    dist.barrier()
            problem, facts = loaded
            try:
                outcome: Outcome = fit_ddp(problem, config.strategy(method), config.train_config(), seed)
            except (DivergenceError, ValueError) as error:
                if isinstance(error, ValueError):
                    raise ConfigError(str(error)) from None
                outcome = error
            if rank == 0:
                grid.finish(Task(method, [seed]), [outcome], facts, quiet, log)
            dist.barrier()
        return grid.results([method]) if rank == 0 else None

