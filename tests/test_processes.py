"""The local executor's worker processes: the same records as one process, how many, and none outliving the driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import metadistill.processes as processes
from metadistill.config import build_config
from metadistill.experiment import run_experiment

SETTINGS = ["epochs=40", "eval_every=20", "teacher_steps=2000", "batch_runs=2", "hyperopt_trials=2"]


def _records(out: Path) -> dict[str, tuple[dict, str]]:
    """Each run's result (less its wall time and facts of the process) and history, by run directory."""
    records = {}
    for path in sorted(out.glob("synthetic/*/run_*/result.json")):
        result = json.loads(path.read_text())
        extra = result.pop("extra")
        result.pop("wall_s")
        records[str(path.parent.relative_to(out))] = (result, extra.get("executor"),
                                                      (path.parent / "history.jsonl").read_text())
    return records


def test_worker_processes_write_the_records_of_one_process(tmp_path):
    config = build_config("synthetic", SETTINGS)
    methods, seeds = ["naive", "gradient", "hyperopt"], [0, 1, 2]  # 7 tasks: 2 + 2 runs batched, 3 searches
    alone = run_experiment(config, methods, seeds, tmp_path / "one", quiet=True, workers=1)
    pooled = run_experiment(config, methods, seeds, tmp_path / "two", quiet=True, workers=2)
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert len(one) == 9 and one.keys() == two.keys()
    for name in one:
        assert one[name][0] == two[name][0] and one[name][2] == two[name][2], name
        assert one[name][1] is None and two[name][1] == "processes"
    assert [r["final_test_acc"] for r in alone["gradient"]] == [r["final_test_acc"] for r in pooled["gradient"]]


def test_default_workers_fill_the_cpus_with_pinned_threads(monkeypatch):
    monkeypatch.setattr(processes, "usable_cpus", lambda: 8)
    assert processes.default_workers(build_config("synthetic")) == 8  # the preset pins threads = 1
    assert processes.default_workers(build_config("synthetic", ["threads=3"])) == 2
    assert processes.default_workers(build_config("synthetic", ["threads=0"])) == 1  # torch's default: every CPU
    assert processes.default_workers(build_config("synthetic", ["threads=16"])) == 1
    assert processes.default_workers(build_config("fashion-mnist")) == 1


def test_workers_are_for_the_local_executor(tmp_path):
    with pytest.raises(ValueError, match="workers is for the local executor"):
        run_experiment(build_config("synthetic", SETTINGS), ["naive"], [0], tmp_path, quiet=True, workers=0)


def _driver_with_two_workers(out: Path) -> tuple[subprocess.Popen, list[int]]:
    """A reproduce command training two endless tasks in two worker processes, and the workers' pids."""
    command = [sys.executable, "-m", "metadistill.cli", "reproduce", "--dataset", "synthetic", "--runs", "2",
               "--methods", "gradient,online", "--set", "epochs=100000", "--set", "teacher_steps=200",
               "--workers", "2", "--out", str(out), "--quiet"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    children: list[int] = []
    deadline = time.time() + 120
    while len(children) < 2 and driver.poll() is None and time.time() < deadline:
        time.sleep(0.1)
        # forked workers run the driver's command line; any other child (a short-lived helper program) is not one
        children = [int(pid) for pid in Path(f"/proc/{driver.pid}/task/{driver.pid}/children").read_text().split()
                    if _command_line(int(pid)) == _command_line(driver.pid)]
    if len(children) < 2:
        driver.kill()
        pytest.fail(driver.communicate()[1] or "no workers")
    return driver, children


def _command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it has ended
        return b""


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.time() + seconds
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in pids if _running(pid)]
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the driver's death signal is Linux's prctl")
def test_no_worker_outlives_a_killed_driver(tmp_path):
    driver, children = _driver_with_two_workers(tmp_path)
    driver.kill()
    driver.wait()
    alive = _wait_gone(children, 30)
    assert not alive, f"workers {alive} still run after their driver was killed"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the workers' pids from /proc")
def test_a_killed_worker_stops_the_experiment_with_one_error(tmp_path):
    driver, children = _driver_with_two_workers(tmp_path)
    os.kill(children[0], signal.SIGKILL)  # as the out-of-memory killer would
    try:
        _, stderr = driver.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        driver.kill()
        pytest.fail("the driver waits on after a worker was killed")
    assert driver.returncode == 1
    assert "a worker process ended without finishing its task" in stderr and "rerun the same command" in stderr
    assert "Traceback" not in stderr
    assert not _wait_gone(children, 30), "the other worker trains on"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return bool(status) and status.split(")")[-1].split()[0] != "Z"  # a zombie has ended
