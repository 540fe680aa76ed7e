"""Records you can trust: identities, diverged runs in a grid, non-finite hypergradients, torn records,
checkpoints that cannot run code."""

import dataclasses
import json
import math
import os

import pytest
import torch
from torch import nn

import metadistill.experiment as experiment
import metadistill.tasks as tasks
from metadistill.cli import main
from metadistill.config import build_config
from metadistill.data.synthetic import synthetic_problem
from metadistill.engine import fit, fit_batched
from metadistill.results import DivergenceError
from metadistill.strategies import Gradient, MetaOptimizer
from metadistill.tasks import context_of, run_identity
from metadistill.train import TrainConfig

FAST = ["--set", "epochs=40", "--set", "eval_every=20", "--set", "teacher_steps=2000", "--quiet"]
SHORT = TrainConfig(epochs=30, batch_size=0, lr=1.0, t_val=0.1, eval_every=10)


def test_identity_holds_the_code_version_and_the_teacher_and_drops_unused_settings(monkeypatch):
    config = build_config("synthetic", ["window=7", "gamma=0.5"])
    naive = run_identity(config, "naive", 0, context_of(config, None))
    assert naive["code"].startswith("0.1.0+") and "window" not in naive and "gamma" not in naive
    assert "meta_lr" not in naive and "teacher_arch" not in naive and "lambda1" in naive
    proposed = run_identity(config, "proposed", 0, context_of(config, None))
    assert proposed["window"] == 7 and "gamma" not in proposed and "hyperopt_trials" not in proposed
    assert run_identity(config, "online", 0, context_of(config, None))["gamma"] == 0.5
    monkeypatch.setattr(tasks, "code_version", lambda: "0.1.0+other")
    assert run_identity(config, "naive", 0, context_of(config, None))["code"] == "0.1.0+other"


def test_the_teacher_entry_names_the_teacher_setup():
    from metadistill.data.vision import VisionData

    g = torch.Generator().manual_seed(0)
    images = torch.randn(40, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (40,), generator=g)
    data = VisionData("fashion-mnist", images[:20], labels[:20], images[20:30], labels[20:30], images[30:],
                      labels[30:])
    config = build_config("fashion-mnist", [])
    a = context_of(config, data)["teacher"]
    assert a == context_of(config, data)["teacher"]
    assert context_of(dataclasses.replace(config, teacher_epochs=3), data)["teacher"] != a
    changed = dataclasses.replace(data, y_train=(data.y_train + 1) % 10)
    assert context_of(config, changed)["teacher"] != a


def test_records_of_other_code_are_not_mixed_in(tmp_path, capsys, monkeypatch):
    out = tmp_path / "records"
    assert main(["run", "--dataset", "synthetic", "--method", "naive", "--runs", "1", "--out", str(out), *FAST]) == 0
    # a setting naive does not use changes nothing: the run is reused, with a note that it is ignored
    assert main(["run", "--dataset", "synthetic", "--method", "naive", "--runs", "1", "--out", str(out),
                 "--set", "window=5", *FAST[:-1]]) == 0
    assert "naive ignores window" in capsys.readouterr().err
    monkeypatch.setattr(tasks, "code_version", lambda: "0.1.0+elsewhere")
    code = main(["run", "--dataset", "synthetic", "--method", "naive", "--runs", "1", "--out", str(out), *FAST])
    assert code == 2 and "other settings (code differ)" in capsys.readouterr().err


@pytest.mark.parametrize("workers,batch", [("1", "10"), ("2", "1")])  # a batch of 3 runs here (less the held
# one), or 3 tasks handed to 2 worker processes
def test_a_run_another_process_is_training_is_left_to_it(tmp_path, capsys, workers, batch):
    """Two commands on one records directory: the second leaves the run the first holds to it, trains the others,
    says so and exits 1; rerun once the first has ended, it trains that run (nothing else)."""
    import subprocess
    import sys

    out = tmp_path / "records"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from metadistill.records import Claims; "
                               "claims = Claims(sys.argv[1], 'synthetic'); print(claims.take('naive', [1]), "
                               "flush=True); sys.stdin.read()", str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "[]"  # it holds naive run 1
        command = ["run", "--dataset", "synthetic", "--method", "naive", "--runs", "3", "--workers", workers,
                   "--set", f"batch_runs={batch}", "--out", str(out), *FAST]
        assert main(command) == 1
        err = capsys.readouterr().err
        assert "naive run 1 was being trained by another process, left to it" in err and err.count("\n") == 1
        runs = out / "synthetic" / "naive"
        assert sorted(p.parent.name for p in runs.glob("run_*/result.json")) == ["run_000", "run_002"]
        assert "naive" in (out / "report.md").read_text()  # the finished runs are reported
    finally:
        holder.communicate("")  # its claim ends with it
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("run_*/result.json")}
    assert main(command) == 0
    assert sorted(p.parent.name for p in runs.glob("run_*/result.json")) == ["run_000", "run_001", "run_002"]
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())


def test_where_the_filesystem_refuses_locks_runs_are_not_claimed_and_train(tmp_path, monkeypatch):
    import errno

    from metadistill import records

    def refuse(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(records.fcntl, "lockf", refuse)
    claims = records.Claims(tmp_path, "synthetic")
    assert claims.take("naive", [0, 1]) == [] and claims.take("naive", [2]) == []
    claims.release("naive", [0, 1, 2])
    claims.close()
    out = tmp_path / "records"
    assert main(["run", "--dataset", "synthetic", "--method", "naive", "--runs", "1", "--out", str(out), *FAST]) == 0
    assert (out / "synthetic" / "naive" / "run_000" / "result.json").exists()


def test_a_run_recorded_by_another_process_after_the_scan_is_taken_as_recorded(tmp_path):
    out = tmp_path / "records"
    config = build_config("synthetic", [item for item in FAST[:-1] if item != "--set"])
    grid = experiment.Grid(config, out, context_of(config, None)).scan(["naive"], [0, 1], retry_diverged=False)
    assert grid.pending == {"naive": [0, 1]}
    # another process records run 0 (here: this one, with its own claims, released when it ends)
    assert main(["run", "--dataset", "synthetic", "--method", "naive", "--runs", "1", "--out", str(out), *FAST]) == 0
    task = grid.claim(tasks.Task("naive", [0, 1]))
    assert task == tasks.Task("naive", [1]) and grid.finished["naive"][0]["seed"] == 0 and grid.busy == []
    grid.close()


def test_a_diverging_run_is_recorded_the_grid_goes_on_and_a_rerun_does_not_repeat_it(tmp_path, capsys,
                                                                                      monkeypatch):
    calls = []
    real = experiment.run_task

    def diverge_naive_run_1(config, problem, task, out, context, *options):
        calls.append((task.method, list(task.seeds)))
        outcomes = real(config, problem, task, out, context, *options)
        if task.method == "naive":
            error = DivergenceError("training diverged at step 7 (epoch 7): loss nan")
            error.step, error.lam = 7, (0.5, 1.0)
            outcomes[task.seeds.index(1)] = error
        return outcomes

    monkeypatch.setattr(experiment, "run_task", diverge_naive_run_1)
    out = tmp_path / "records"
    command = ["reproduce", "--dataset", "synthetic", "--runs", "3", "--methods", "naive,gradient,no_distillation",
               "--workers", "1", "--out", str(out), *FAST]  # in this process, where run_task is patched
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "naive run 1: training diverged at step 7" in err and err.count("\n") == 1
    diverged = json.loads((out / "synthetic" / "naive" / "run_001" / "diverged.json").read_text())
    assert diverged["step"] == 7 and diverged["lam"] == [0.5, 1.0]
    finished = sorted(p.parent.name for p in out.glob("synthetic/*/run_*/result.json"))
    assert len(finished) == 8  # every other run of the grid, including the methods after naive
    report = (out / "report.md").read_text()
    assert "naive run 1 diverged" in report
    # a rerun trains nothing, and says again which run diverged
    calls.clear()
    assert main(command) == 1
    assert calls == [] and "recorded earlier; --retry-diverged retrains it" in capsys.readouterr().err
    # asked to, it retrains that run only
    monkeypatch.setattr(experiment, "run_task", real)
    assert main([*command, "--retry-diverged"]) == 0
    assert not (out / "synthetic" / "naive" / "run_001" / "diverged.json").exists()
    assert (out / "synthetic" / "naive" / "run_001" / "result.json").exists()


def test_non_finite_hypergradients_are_counted_and_too_many_fail_the_run():
    problem, _ = synthetic_problem(0, 500, 0.01)
    poisoned = dataclasses.replace(problem, x_val=problem.x_val.clone())
    poisoned.x_val[3, 0] = math.nan  # one validation point: every full-batch validation gradient is NaN
    strategy = Gradient(MetaOptimizer("sgd", 0.1, 0.01), lambda1=0.5, temperature=2.0)
    with pytest.raises(DivergenceError, match="11 of 11 hypergradients were not finite by step 10"):
        fit(poisoned, strategy, SHORT, seed=0)
    tolerant = dataclasses.replace(SHORT, max_nonfinite_fraction=1.0)
    result = fit(poisoned, Gradient(lambda1=0.5, temperature=2.0), tolerant, seed=0)
    assert result.nonfinite_hypergrads == result.hypergrad_evals == 30
    clean = fit(problem, Gradient(lambda1=0.5, temperature=2.0), SHORT, seed=0)
    assert clean.nonfinite_hypergrads == 0


def test_report_skips_a_torn_or_foreign_record_with_a_warning(tmp_path, capsys):
    out = tmp_path / "records"
    assert main(["run", "--dataset", "synthetic", "--method", "naive", "--runs", "2", "--out", str(out), *FAST]) == 0
    torn = out / "synthetic" / "naive" / "run_001" / "result.json"
    torn.write_text(torn.read_text()[:40])
    foreign = out / "synthetic" / "other" / "run_000" / "result.json"
    foreign.parent.mkdir(parents=True)
    foreign.write_text(json.dumps({"hello": 1}))
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"skipping {torn}: unreadable" in captured.err and f"skipping {foreign}: not a metadistill" in captured.err
    assert "Traceback" not in captured.err
    assert "naive" in captured.out and main(["plot", str(out)]) == 0


def test_report_compares_the_methods_run_by_run_and_lists_every_run(tmp_path):
    """Handmade records: three seeds of two methods, b's run 2 diverged; the pairwise cell is over seeds 0 and 1."""
    out = tmp_path / "records"
    accuracies = {"naive": {0: 0.80, 1: 0.85, 2: 0.90}, "hyperopt": {0: 0.83, 1: 0.84}}
    for method, by_seed in accuracies.items():
        for seed, acc in by_seed.items():
            record = {"method": method, "seed": seed, "final_test_acc": acc, "final_val_acc": acc - 0.01,
                      "wall_s": 1.0, "steps": 10, "hypergrad_evals": 0, "full_trainings": 1, "extra": {"code": "v"}}
            (out / "synthetic" / method / f"run_{seed:03d}").mkdir(parents=True)
            (out / "synthetic" / method / f"run_{seed:03d}" / "result.json").write_text(json.dumps(record))
    (out / "synthetic" / "hyperopt" / "run_002").mkdir()
    (out / "synthetic" / "hyperopt" / "run_002" / "diverged.json").write_text(json.dumps(
        {"seed": 2, "message": "loss nan", "step": 3, "lam": [0.5, 1.0], "wall_s": 0.5}))
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| 2 | 0.9000 | diverged |" in report
    # naive - hyperopt over seeds 0 and 1: (-0.03 + 0.01) / 2
    assert "| naive |  | -0.0100 (1 ahead, 1 behind) |" in report
    assert "| hyperopt | +0.0100 (1 ahead, 1 behind) |  |" in report
    rows = (out / "runs.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,method,seed,status,final_test_acc,final_val_acc") and len(rows) == 7
    assert rows[1:] == [
        "synthetic,naive,0,finished,0.8,0.79,,,10,0,1,1,v", "synthetic,naive,1,finished,0.85,0.84,,,10,0,1,1,v",
        "synthetic,naive,2,finished,0.9,0.89,,,10,0,1,1,v", "synthetic,hyperopt,0,finished,0.83,0.82,,,10,0,1,1,v",
        "synthetic,hyperopt,1,finished,0.84,0.83,,,10,0,1,1,v", "synthetic,hyperopt,2,diverged,,,,,,,,0.5,-"]


class _Crafted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_runs_no_code_and_is_not_resumed(tmp_path):
    problem, _ = synthetic_problem(0, 500, 0.01)
    marker, path = tmp_path / "marker", tmp_path / "train.ckpt"
    torch.save({"identity": None, "step": 5, "payload": _Crafted(marker)}, path)
    torch.load(path, weights_only=False)  # harmful to a plain torch.load
    assert marker.exists()
    marker.unlink()
    steps = []
    config = dataclasses.replace(SHORT, epochs=4)
    strategies = [Gradient(lambda1=0.5, temperature=2.0) for _ in range(2)]
    fit_batched(problem, strategies, config, [0, 1], lambda step, total: steps.append(step), path, "x")
    assert not marker.exists() and steps[0] == 1


def test_a_checkpoint_of_other_settings_is_not_resumed_through_the_api(tmp_path):
    problem, _ = synthetic_problem(0, 500, 0.01)
    path = tmp_path / "train.ckpt"
    config = dataclasses.replace(SHORT, epochs=6)

    class Stop(Exception):
        pass

    def stop(step, total):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        fit_batched(problem, [Gradient(lambda1=0.5, temperature=2.0) for _ in range(2)], config, [0, 1], stop, path,
                    checkpoint_every_s=0.0)
    assert path.exists()
    steps = []
    other = dataclasses.replace(config, lr=0.5)  # same seeds, same (absent) identity, other settings
    fit_batched(problem, [Gradient(lambda1=0.5, temperature=2.0) for _ in range(2)], other, [0, 1],
                lambda step, total: steps.append(step), path)
    assert steps[0] == 1
    steps.clear()
    fit_batched(problem, [Gradient(lambda1=0.5, temperature=2.0) for _ in range(2)], config, [0, 1],
                lambda step, total: steps.append(step), path)
    assert steps[0] == 5  # the same runs resume: 4 steps were checkpointed, the 5th is the first taken again


class Residual(nn.Module):
    """A student the stacking cannot handle (a skip connection and LayerNorm)."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.norm(torch.tanh(self.a(x)))
        return self.b(h + h.mean(1, keepdim=True))


def test_a_student_that_cannot_be_stacked_trains_one_run_at_a_time_through_fit_batched():
    problem, _ = synthetic_problem(0, 500, 0.01)
    problem = dataclasses.replace(problem, make_student=Residual)
    strategies = [Gradient(lambda1=0.5, temperature=2.0) for _ in range(3)]
    batched = fit_batched(problem, strategies, SHORT, [0, 1, 2])
    for seed, outcome in enumerate(batched):
        single = fit(problem, Gradient(lambda1=0.5, temperature=2.0), SHORT, seed)
        assert outcome.history == single.history and outcome.final_test_acc == single.final_test_acc


def test_write_check_leaves_another_runs_probe_alone(tmp_path):
    """Two runs started at the same moment into one folder both check it; neither may delete the other's probe
    (with one shared probe name the second run failed with 'No such file or directory')."""
    from metadistill.records import check_writable

    other = tmp_path / ".write-test"
    other.write_text("another run's probe")
    check_writable(tmp_path)
    assert other.read_text() == "another run's probe"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".write-test"]
