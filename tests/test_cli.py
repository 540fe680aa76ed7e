"""The command line: bad input, records, resume, report."""

import errno
import json
import os
import subprocess
import sys

import pytest

import metadistill.experiment as experiment
from metadistill.cli import main
from metadistill.config import DEFAULT_METHODS as METHODS

FAST = ["--set", "epochs=40", "--set", "eval_every=20", "--set", "teacher_steps=2000", "--quiet"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "metadistill.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("args,needle", [
    (["run", "--dataset", "imagenet", "--method", "naive"], "invalid choice: 'imagenet'"),
    (["run", "--dataset", "synthetic", "--method", "magic"], "invalid choice: 'magic'"),
    (["run", "--dataset", "synthetic", "--method", "naive", "--set", "lambda1=1.5"], "lambda1 must be in [0.0, 1.0]"),
    (["run", "--dataset", "synthetic", "--method", "naive", "--set", "temperature=0.05"],
     "temperature must be in [0.1, 10.0]"),
    (["run", "--dataset", "synthetic", "--method", "naive", "--set", "temperature=hot"], "expects a float"),
    (["run", "--dataset", "synthetic", "--method", "naive", "--set", "lr=nan"], "expects a float"),
    (["run", "--dataset", "synthetic", "--method", "naive", "--set", "colour=red"], "unknown setting 'colour'"),
    (["run", "--dataset", "synthetic", "--method", "naive", "--set", "window=1"], "window must be >= 2"),
    (["run", "--dataset", "synthetic", "--method", "naive", "--runs", "0"], "positive integer"),
    (["reproduce", "--dataset", "synthetic", "--methods", "naive,magic"], "unknown method(s) magic"),
    (["report", "/nonexistent/records"], "no records directory"),
    (["run", "--dataset", "synthetic", "--method", "naive", "--ddp"], "--ddp runs under torchrun"),
    (["run", "--dataset", "synthetic", "--method", "hyperopt", "--ddp"], "hyperopt is not supported"),
    (["run", "--dataset", "synthetic", "--method", "naive", "--executor", "cluster"], "invalid choice: 'cluster'"),
    (["run", "--dataset", "synthetic", "--method", "naive", "--executor", "ray", "--workers", "2"],
     "--workers is for the local executor"),
    (["run", "--dataset", "synthetic", "--method", "naive", "--device", "gpu"], "device must be a torch device (cpu"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    try:
        code = main(args)
    except SystemExit as stop:  # argparse's own checks
        code = stop.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


@pytest.mark.parametrize("gpus,device,needle", [
    (0, "cuda", "torch sees no CUDA GPU here"),
    (1, "cuda:1", "has 1 CUDA GPU(s), numbered from 0"),
])
def test_a_cuda_device_the_machine_lacks_is_one_line_and_exit_2(gpus, device, needle, monkeypatch, tmp_path, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for command in (["run", "--method", "naive", "--out", str(tmp_path)], ["teacher"]):
        dataset = "synthetic" if command[0] == "run" else "fashion-mnist"
        code = main([*command, "--dataset", dataset, "--device", device])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_the_optuna_method_without_optuna_installed_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    code = main(["run", "--dataset", "synthetic", "--method", "optuna", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == ["metadistill: error: method optuna needs optuna: pip install 'metadistill[optuna]'"]
    assert not (tmp_path / "out").exists()


def test_bad_input_in_a_real_process_has_no_traceback():
    done = cli("run", "--dataset", "synthetic", "--method", "naive", "--set", "lambda1=2")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = cli("run", "--dataset", "synthetic", "--method", "naive", "--out", str(blocker / "sub"), *FAST)
    assert done.returncode == 2 and "cannot write records" in done.stderr and "Traceback" not in done.stderr


def test_help_documents_every_option():
    done = cli("reproduce", "--help")
    for option in ["--dataset", "--runs", "--out", "--set", "--methods", "--epochs", "--quiet", "meta_lr", "window"]:
        assert option in done.stdout


def test_run_records_resume_and_conflict(tmp_path, capsys):
    out = tmp_path / "records"
    assert main(["run", "--dataset", "synthetic", "--method", "gradient", "--runs", "2", "--out", str(out), *FAST]) == 0
    table = capsys.readouterr().out
    assert "gradient" in table and "mean" in table
    run0 = out / "synthetic" / "gradient" / "run_000"
    assert {p.name for p in run0.iterdir()} >= {"config.json", "history.jsonl", "result.json"}
    result = json.loads((run0 / "result.json").read_text())
    assert result["hypergrad_evals"] == 40 and result["seed"] == 0 and len(result["evals"]) == 2
    lines = (run0 / "history.jsonl").read_text().splitlines()
    assert len(lines) == 40 and set(json.loads(lines[0])) >= {"lambda1", "temperature", "train_loss", "val_loss"}
    assert (out / "report.md").exists() and (out / "results.csv").exists()

    stamp = os.stat(run0 / "result.json").st_mtime_ns
    assert main(["run", "--dataset", "synthetic", "--method", "gradient", "--runs", "3", "--out", str(out),
                 *FAST]) == 0
    assert os.stat(run0 / "result.json").st_mtime_ns == stamp  # finished run skipped
    assert (out / "synthetic" / "gradient" / "run_002" / "result.json").exists()

    code = main(["run", "--dataset", "synthetic", "--method", "gradient", "--runs", "1", "--out", str(out),
                 *FAST, "--set", "meta_lr=0.5"])
    assert code == 2 and "other settings (meta_lr differ)" in capsys.readouterr().err


def test_reproduce_all_methods_and_report(tmp_path, capsys):
    out = tmp_path / "records"
    code = main(["reproduce", "--dataset", "synthetic", "--runs", "2", "--out", str(out), *FAST,
                 "--set", "hyperopt_trials=2", "--set", "window=4", "--set", "period=3"])
    assert code == 0
    table = capsys.readouterr().out
    for method in METHODS:
        assert method in table
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("dataset,method,runs,diverged,mean,sd,max") and len(csv_lines) == 1 + len(METHODS)
    columns = csv_lines[0].split(",")
    hyper = dict(zip(columns, [line for line in csv_lines if ",hyperopt," in line][0].split(",")))
    assert hyper["full_trainings"] == "3"  # 2 trials + 1 final training
    assert hyper["code"].startswith("0.1.0+") and hyper["diverged"] == "0"
    report = (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text().split("## Environment")[0] == report.split("## Environment")[0]


def test_interrupted_reproduce_resumes_without_redoing_finished_runs(tmp_path):
    """Killed (SIGKILL), interrupted (Ctrl-C), stopped (SIGTERM), then rerun: finished runs are never redone."""
    import signal
    import time

    out = tmp_path / "records"
    command = [sys.executable, "-m", "metadistill.cli", "reproduce", "--dataset", "synthetic", "--runs", "3",
               "--methods", "naive,gradient", "--out", str(out), "--set", "epochs=1500",
               "--set", "teacher_steps=2000", "--set", "batch_runs=1", "--quiet"]

    def finished():
        return {p: p.stat().st_mtime_ns for p in out.glob("*/*/run_*/result.json")}

    def start_and_stop_after(count, sig):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while len(finished()) < count and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        process.send_signal(sig)
        _, err = process.communicate(timeout=120)
        return process.returncode, err

    code, _ = start_and_stop_after(1, signal.SIGKILL)
    assert code == -signal.SIGKILL
    first = finished()
    assert 1 <= len(first) < 6
    second = first
    for sig, expected in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):  # Ctrl-C, then kill
        code, err = start_and_stop_after(len(second) + 1, sig)
        before, second = second, finished()
        if len(second) < 6:  # it was stopped mid-way, as intended
            assert code == expected and "rerun the same command to resume" in err
        assert all(second[p] == stamp for p, stamp in before.items())
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    third = finished()
    assert len(third) == 6
    assert all(third[p] == stamp for p, stamp in second.items())


def test_torchrun_ddp_run_writes_the_records_of_the_one_process_run(tmp_path):
    """Two gloo ranks under torchrun train one student per run; rank 0 writes what one process would."""
    settings = ["--set", "epochs=30", "--set", "batch_size=8", "--set", "eval_every=10", "--set",
                "teacher_steps=2000", "--set", "batch_runs=1", "--quiet"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    done = cli("run", "--dataset", "synthetic", "--method", "gradient", "--runs", "1", "--out", str(single),
               *settings)
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "metadistill.cli", "run", "--dataset", "synthetic", "--method", "gradient", "--runs", "1",
                           "--out", str(ddp), "--ddp", *settings], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    run = "synthetic/gradient/run_000"
    a = [json.loads(line) for line in (single / run / "history.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (ddp / run / "history.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 30 * 2
    for x, y in zip(a, b):
        assert y["lambda1"] == pytest.approx(x["lambda1"], rel=1e-5)
        assert y["temperature"] == pytest.approx(x["temperature"], rel=1e-5)
    first, second = (json.loads((d / run / "result.json").read_text()) for d in (single, ddp))
    assert second["final_test_acc"] == first["final_test_acc"] and second["extra"]["world_size"] == 2


def test_a_full_disk_is_one_clear_error_and_keeps_the_finished_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "records"
    real, saved = experiment.save_run, []

    def disk_full_after_one_run(directory, identity, result):
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "result.json"))
        saved.append(directory)
        return real(directory, identity, result)

    monkeypatch.setattr(experiment, "save_run", disk_full_after_one_run)
    command = ["run", "--dataset", "synthetic", "--method", "naive", "--runs", "2", "--set", "batch_runs=1",
               "--workers", "1", "--out", str(out), *FAST]  # in order: run 0 is saved, run 1 meets the full disk
    assert main(command) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"metadistill: error: No space left on device ({out}/synthetic/naive/run_001/result.json); "
                   "finished runs are kept, free some space and rerun the same command to resume"]
    stamp = os.stat(out / "synthetic" / "naive" / "run_000" / "result.json").st_mtime_ns
    monkeypatch.setattr(experiment, "save_run", real)
    assert main(command) == 0  # space again: run 1 only is trained
    assert os.stat(out / "synthetic" / "naive" / "run_000" / "result.json").st_mtime_ns == stamp
    assert (out / "synthetic" / "naive" / "run_001" / "result.json").exists()
