"""The Ray executor (an optional extra): the same records as in-process, resume after a kill; ray never needed."""

import csv
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from metadistill.config import DEFAULT_METHODS

GRID = ["reproduce", "--dataset", "synthetic", "--quick", "--runs", "2", "--quiet"]


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "metadistill.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def results(out):
    """{(method, seed): result.json without its timings}, and every history.jsonl."""
    found = {}
    for path in sorted(out.glob("synthetic/*/run_*/result.json")):
        record = json.loads(path.read_text())
        for key in ("wall_s", "extra"):
            record.pop(key)
        found[(record["method"], record["seed"])] = (record, (path.parent / "history.jsonl").read_text())
    return found


def test_the_default_executor_never_imports_ray(tmp_path):
    code = ("import sys; from metadistill.cli import main; "
            f"code = main({GRID + ['--methods', 'naive', '--out', str(tmp_path)]!r}); "
            "assert code == 0, code; assert 'ray' not in sys.modules, 'ray was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def test_ray_executor_without_ray_installed_is_one_clear_error(tmp_path, cli_without_ray):
    code, stderr = cli_without_ray(GRID + ["--methods", "naive", "--executor", "ray", "--out", str(tmp_path)])
    assert (code, stderr) == (2, ["metadistill: error: --executor ray needs ray: pip install 'metadistill[ray]'"])


def test_ray_options_need_the_ray_executor(tmp_path):
    done = cli(*GRID, "--out", str(tmp_path), "--ray-num-cpus", "2")
    assert done.returncode == 2 and "need --executor ray" in done.stderr


def test_ray_grid_writes_the_same_records_and_report_as_in_process(tmp_path):
    pytest.importorskip("ray")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    done = cli(*GRID, "--out", str(local))
    assert done.returncode == 0, done.stderr
    done = cli(*GRID, "--out", str(on_ray), "--executor", "ray", "--ray-num-cpus", "2")
    assert done.returncode == 0, done.stderr
    assert not list(local.glob("synthetic/*/.batch_*")) and not list(on_ray.glob("synthetic/*/.batch_*"))
    expected, got = results(local), results(on_ray)
    assert len(expected) == 2 * len(DEFAULT_METHODS) and got == expected
    extras = [json.loads(p.read_text())["extra"] for p in on_ray.glob("synthetic/*/run_*/result.json")]
    assert all(extra["executor"] == "ray" for extra in extras)

    def table(out):
        with open(out / "results.csv") as handle:
            return [{k: v for k, v in row.items() if "wall" not in k} for row in csv.DictReader(handle)]

    assert table(on_ray) == table(local)
    report = (on_ray / "report.md").read_text()
    assert "## synthetic" in report and "figures/synthetic_trajectories.png" in report


def test_killed_ray_grid_reruns_only_the_missing_runs(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "records"
    command = [sys.executable, "-m", "metadistill.cli", *GRID, "--methods", "naive,gradient,proposed",
               "--set", "batch_runs=1", "--set", "epochs=3000", "--out", str(out), "--executor", "ray",
               "--ray-num-cpus", "2"]

    def finished():
        return {p: p.stat().st_mtime_ns for p in out.glob("*/*/run_*/result.json")}

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 300
    while not finished() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray runtime it started
    process.communicate(timeout=60)
    first = finished()
    assert 1 <= len(first) < 6
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    second = finished()
    assert len(second) == 6
    assert all(second[p] == stamp for p, stamp in first.items())  # finished runs were not redone


def test_only_rays_token_auth_notice_is_left_out():
    """Ray's notice that a new local runtime turned on token authentication is dropped at ray.init; its other
    lines (the warning that a cluster runs without authentication) are not."""
    pytest.importorskip("ray")
    import importlib

    from metadistill import runtime

    setup = importlib.import_module(runtime._TOKEN_LOGGER)  # the module that logs the notice, in this ray
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    setup.logger.addHandler(handler)  # ray's loggers do not propagate to the root
    try:
        with runtime._without_token_notice():
            setup._warn_token_auth_enabled()
            setup._warn_token_auth_disabled()
        assert [message[:50] for message in seen] == ["Token authentication is disabled for this Ray clus"]
        setup._warn_token_auth_enabled()  # outside the block, the logger is as it was
        assert seen[-1].startswith(runtime._TOKEN_NOTICE)
    finally:
        setup.logger.removeHandler(handler)


def test_a_local_runtime_runs_its_workers_at_normal_priority(monkeypatch):
    """Ray's default worker niceness (15) starved pbt's members and the Ray executor's runs whenever they shared a
    core with another process; a runtime started here runs them at 0, and leaves the environment as it was."""
    pytest.importorskip("ray")
    from metadistill.runtime import ray_runtime

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    with ray_runtime(None, 1, quiet=True) as ray:
        niceness = ray.get(ray.remote(lambda: os.nice(0)).remote())
    assert niceness == os.nice(0) == 0
    assert "RAY_worker_niceness" not in os.environ


def test_an_error_in_a_ray_worker_is_reported_as_in_process(tmp_path, monkeypatch, capsys):
    """A full disk on a worker is the command line's one line and exit 1, as in process; before, Ray's wrapper
    (whose message is the worker's traceback, and whose errno is lost) went out as a traceback."""
    pytest.importorskip("ray")
    from metadistill import cli, ray_executor

    def full_disk(config_values, method, seeds, out):
        raise OSError(errno.ENOSPC, "No space left on device", out)

    monkeypatch.setattr(ray_executor, "_task", full_disk)
    code = cli.main([*GRID, "--runs", "1", "--methods", "naive", "--executor", "ray", "--ray-num-cpus", "1",
                     "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines()[-1] == (f"metadistill: error: No space left on device ({tmp_path}); finished runs are "
                                    "kept, free some space and rerun the same command to resume")
    assert "Traceback" not in err
