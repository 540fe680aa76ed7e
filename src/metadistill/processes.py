"""The local executor's worker processes: tasks (a method's batch of runs) trained several at a time, each in a
process of its own, on one machine.

`run_experiment` uses them when a task is pinned to fewer threads than the machine has CPUs (the synthetic
preset's `threads = 1`, or `--set threads=N`), `default_workers` at a time, or `--workers N`. As with Ray, the
driver loads the problem first (an image dataset's teacher is trained once, into the cache) and writes each
task's records itself as soon as the task returns; a worker checkpoints a batch in progress under the same
--out, so an interrupted experiment resumes. On Linux the workers are forked from the driver once its problem
is loaded, and share it (they start in milliseconds, which is what makes them pay off on tasks of seconds);
elsewhere they are spawned, and each loads the problem again (the teacher from the cache). A worker dies with
the driver, however the driver ends; a worker that dies (killed from outside, out of memory) stops the
experiment with WorkerDied, the other tasks' records kept.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .config import ExperimentConfig
from .engine import Outcome
from .problem import Problem
from .runtime import libc
from .tasks import Task, run_task, run_task_alone, tagged


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(config: ExperimentConfig) -> int:
    """How many tasks the local executor trains at a time when not told: on the CPU, with `threads` pinned,
    as many as the usable CPUs hold (CPUs // threads); otherwise 1, in the driver's own process (torch's
    default threads already use every CPU, and a GPU is one device)."""
    if not config.threads or config.device != "cpu":
        return 1
    return max(1, usable_cpus() // config.threads)


class WorkerDied(RuntimeError):
    """A worker process ended without returning its task (a signal, the out-of-memory killer)."""


_problem: Problem | None = None  # the driver's, inherited by forked workers
_context: dict[str, Any] = {}


def _start_worker() -> None:
    """Ctrl-C is the driver's (it stops every worker; their checkpoints stay); SIGTERM ends a worker; on Linux a
    worker gets SIGTERM when the driver dies (even by SIGKILL), so that none trains on alone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    c = libc()
    if c is not None:
        c.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the driver died before prctl took effect
            os._exit(1)


def _job(job: tuple[int, dict, str, list[int], str]) -> tuple[int, list[Outcome]]:
    index, values, method, seeds, out = job
    if _problem is None:  # spawned: a fresh interpreter
        return index, run_task_alone(values, method, seeds, out, "processes")
    return index, tagged(run_task(ExperimentConfig(**values), _problem, Task(method, seeds), Path(out), _context),
                         "processes")


def run_in_processes(config: ExperimentConfig, problem: Problem, context: dict[str, Any], tasks: list[Task],
                     out: Path, workers: int, quiet: bool = False) -> Iterator[tuple[Task, list[Outcome]]]:
    """Yield (task, outcomes) for every task, in the order they finish, from `workers` processes. Leaving the
    loop early (an error, Ctrl-C, SIGTERM) terminates the workers."""
    global _problem, _context
    if not tasks:
        return
    fork = sys.platform.startswith("linux")
    values = dataclasses.asdict(config)
    jobs = [(i, values, task.method, task.seeds, str(Path(out).resolve())) for i, task in enumerate(tasks)]
    count = min(workers, len(tasks))
    _problem, _context = (problem, context) if fork else (None, {})
    ours = set(multiprocessing.active_children())  # the caller's own children, left alone
    pending: set[Future] = set()
    pool = ProcessPoolExecutor(count, multiprocessing.get_context("fork" if fork else "spawn"), _start_worker)
    try:
        with tqdm(total=len(tasks), desc=f"{config.dataset}: tasks in {count} processes", unit="task",
                  disable=quiet, leave=False, dynamic_ncols=True) as bar:
            pending = {pool.submit(_job, job) for job in jobs}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda future: future.exception() is not None):  # results first
                    try:
                        index, outcomes = future.result()
                    except BrokenProcessPool:
                        raise WorkerDied("a worker process ended without finishing its task (killed by a signal, "
                                         "or out of memory?)") from None
                    bar.update()
                    yield tasks[index], outcomes
    finally:
        _problem, _context = None, {}
        pool.shutdown(wait=False, cancel_futures=True)
        if pending:  # left early: the workers still training are stopped now (their checkpoints stay)
            for worker in set(multiprocessing.active_children()) - ours:
                worker.terminate()
        pool.shutdown(wait=True)
