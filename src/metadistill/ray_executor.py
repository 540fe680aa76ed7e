"""The Ray executor: each task (dataset, method, batch of runs) runs as a Ray task with declared resources.

Only imported with `--executor ray`; ray is an optional extra (pip install 'metadistill[ray]'). The
driver (the process that called run_experiment) submits the pending tasks, and writes each task's
records itself as soon as the task returns, so workers need no shared file system for the records
(a batch's epoch checkpoints are written on the worker, under the same --out path). Without an
address, a local Ray runtime is started and shut down at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import ConfigError, ExperimentConfig
from .engine import Outcome
from .runtime import ray_runtime, require_ray, worker_error
from .tasks import run_task_alone


def _task(config_values: dict, method: str, seeds: list[int], out: str) -> list[Outcome]:
    """Runs on a Ray worker: load the problem (data, cached teacher) and train the task's runs."""
    return run_task_alone(config_values, method, seeds, out, "ray")


def resources(config: ExperimentConfig) -> dict[str, float]:
    """What one task declares: its torch threads in CPUs (1 when threads is 0), and one GPU on cuda."""
    return {"num_cpus": float(config.threads or 1), "num_gpus": 1.0 if config.device.startswith("cuda") else 0.0}


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, quiet: bool = False) -> Iterator[Any]:
    """`ray_runtime` for `--executor ray`: a ConfigError (one line) without ray. Inside it, the Ray tasks and
    pbt's members share one runtime."""
    try:
        require_ray("--executor ray")
    except ImportError as error:
        raise ConfigError(str(error)) from None
    with ray_runtime(address, num_cpus, quiet) as ray:
        yield ray


def run_on_ray(config: ExperimentConfig, tasks: list, out: Path, address: str | None = None,
               num_cpus: int | None = None, quiet: bool = False,
               log: Callable[[str], None] = print) -> Iterator[tuple]:
    """Yield (task, outcomes) for every task, in the order they finish."""
    if not tasks:
        return
    with ray_session(address, num_cpus, quiet) as ray:
        remote = ray.remote(_task).options(**resources(config), max_retries=0)
        values = dataclasses.asdict(config)
        pending = {remote.remote(values, task.method, task.seeds, str(Path(out).resolve())): task for task in tasks}
        if not quiet:
            log(f"ray: {len(pending)} task(s) submitted ({resources(config)} each)")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(done[0])
            try:
                outcomes = ray.get(done[0])
            except ray.exceptions.RayTaskError as error:
                raise worker_error(error)  # noqa: B904 (its __cause__ is Ray's error)
            yield task, outcomes
