"""The training engine: one loop for R >= 1 runs of a method, fit(...) -> RunResult, fit_batched(...).

`train_runs` trains R runs (seeds) together. Run r is the same computation whichever way it is
trained: the student built after torch.manual_seed(seed), its own data order (index streams seeded
by its seed), metaparameters, strategy, BatchNorm statistics, hypergradients and evaluations. A
student that `stacked.stack_models` supports is trained as one stacked model when R > 1 (the same
numbers, in less time); any other student trains its runs one at a time through the same loop. A
single run (`fit`) is the case R = 1 on the student as it is; data-parallel training (`ddp.fit_ddp`)
is the same loop with a `Parallel` that shards batches and all-reduces.

The loop, at step t: draw each run's batch; take the real step with each run's lambda_t (keeping
what the hypergradient needs where a strategy wants one); each strategy turns its hypergradient
(computed lazily, once for all runs, counted per run when asked for) into lambda_{t+1}; then the
lr schedule, evaluations and checkpoints. A run whose loss becomes non-finite, or whose hypergradients
are too often non-finite, stops alone; the others go on.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .files import write_atomic
from .hypergrad import OnlineTangent, greedy
from .identity import code_version, tensor_fingerprint
from .meta import Metaparameters
from .problem import Loaders, Problem, Source, evaluate_runs, source_of
from .results import DivergenceError, Evaluations, RunResult, new_history
from .stacked import stack_models
from .steps import Runs, TakenStep, take_step, validation_gradient
from .strategies import Strategy
from .train import Schedule, TrainConfig, build_optimizer, build_scheduler

Outcome = RunResult | DivergenceError
Data = Problem | Loaders
Progress = Callable[[int, int], None]


class Parallel:
    """How the loop's work is shared between processes: here, not at all (one process). ddp.DDPParallel
    shards every batch across the ranks of a process group and all-reduces."""

    def shard(self, index: Tensor) -> Tensor:
        return index

    def forward(self, model: nn.Module) -> Callable[[Tensor], Tensor] | None:
        return None

    def loss_weight(self) -> float:
        return 1.0

    def loss_values(self, losses: Tensor) -> list[float]:
        return losses.tolist()

    def shard_validation(self, index: Tensor) -> Tensor:
        return index

    def validation_gradient(self, model: nn.Module, runs: Runs, x_val: Tensor, y_val: Tensor, t_val: float
                            ) -> tuple[dict[str, Tensor], Tensor]:
        return validation_gradient(model, runs, x_val, y_val, t_val)

    def reduce(self, hypergradients: Tensor, val_losses: Tensor) -> tuple[Tensor, Tensor]:
        return hypergradients, val_losses

    def facts(self) -> dict[str, Any]:
        return {}


def evaluate(model: nn.Module, x: Tensor, y: Tensor, t_val: float = 1.0, batch_size: int = 2048
             ) -> tuple[float, float]:
    """(accuracy, validation loss) of a model in eval mode; the model's mode is restored afterwards."""
    return evaluate_runs(model, Runs(), ((x[i:i + batch_size], y[i:i + batch_size])
                                         for i in range(0, len(x), batch_size)), t_val)[0]


def batchable(problem: Problem | Loaders, config: TrainConfig) -> bool:
    """Whether runs of this problem and config can be trained as one stacked model."""
    if config.hypergrad_method != "jvp":
        return False
    try:
        stack_models([problem.make_student(), problem.make_student()])
    except NotImplementedError:
        return False
    return True


@dataclass
class _Run:
    """One run's own state in the loop."""

    seed: int
    strategy: Strategy
    lam: Metaparameters
    evaluations: Evaluations
    history: dict[str, list] = field(default_factory=new_history)
    hypergrad_evals: int = 0
    nonfinite: int = 0
    failed: dict | None = None  # {"message", "step", "lam"} once it stopped

    def fail(self, message: str, step: int) -> None:
        if self.failed is None:
            self.failed = {"message": message, "step": step, "lam": list(self.lam.as_tuple())}


class Engine:
    """The state of R runs trained together, and the parts of one loop iteration (see `train_runs`)."""

    def __init__(self, data: Problem | Loaders, strategies: list[Strategy], config: TrainConfig, seeds: list[int],
                 parallel: Parallel) -> None:
        self.config, self.parallel = config, parallel
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        students = []
        for seed in seeds:
            torch.manual_seed(seed)
            students.append(data.make_student().to(self.device))
        self.layout = Runs(len(seeds), stacked=len(seeds) > 1)
        if self.layout.stacked and config.hypergrad_method != "jvp":
            raise NotImplementedError("stacked runs compute hypergradients by the jvp method only")
        self.model = stack_models(students) if self.layout.stacked else students[0]
        if config.channels_last and not self.layout.stacked:  # (a model without 4-d weights is unchanged)
            self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.source: Source = source_of(data, config.batch_size, config.val_batch_size, seeds, self.device)
        self.schedule = Schedule.of(config, self.source.steps_per_epoch)
        self.runs = [_Run(seed, strategy, strategy.start(seed), Evaluations(self.schedule.steps_per_epoch))
                     for strategy, seed in zip(strategies, seeds)]
        horizon = getattr(strategies[0], "horizon", None)
        self.online = None if horizon is None or horizon.gamma == 0 else OnlineTangent(horizon.gamma, horizon.hessian)
        self.started, self.earlier_wall = time.perf_counter(), 0.0
        self.steps_done = 0
        self.taken: TakenStep | None = None
        self.wants: list[bool] = []
        self.rows: Tensor | None = None

    def take(self, step: int) -> None:
        """The real step of every run with its current lambda; keeps the TakenStep where a strategy wants it."""
        self.wants = [run.failed is None and run.strategy.wants_hypergradient(step) for run in self.runs]
        # at lambda1 = 1 the loss is the hard-label term alone: the teacher is run (or looked up) only when a run
        # distils, or wants a hypergradient (whose mixed derivative needs it)
        teacher_needed = any(want or run.lam.lambda1 != 1.0 for want, run in zip(self.wants, self.runs))
        x, y, teacher = self.source.train_batch(self.layout, self.parallel.shard, teacher_needed)
        for run in self.runs:
            run.history["lambda1"].append(run.lam.lambda1)
            run.history["temperature"].append(run.lam.temperature)
        losses, self.taken = take_step(
            self.model, self.optimizer, self.layout, x, y, teacher, [run.lam for run in self.runs],
            self.config.t2_scaling, any(self.wants),
            self.parallel.forward(self.model), self.parallel.loss_weight(), self.config.adam_update,
            **(self.online.step_options(step) if self.online is not None and any(self.wants) else {}))
        self.rows = None
        lr = self.optimizer.param_groups[0]["lr"]
        for r, (run, value) in enumerate(zip(self.runs, self.parallel.loss_values(losses))):
            run.history["train_loss"].append(value)
            run.history["val_loss"].append(None)
            if run.failed is None and not math.isfinite(value):
                run.fail(self.schedule.divergence(step, value, run.lam, lr), step)
                self.wants[r] = False

    def hypergradients(self, step: int) -> Tensor:
        """[R, 2] hypergradients of the step just taken, computed once for the runs that want them."""
        if self.rows is None:
            assert self.taken is not None, "the step was taken without keeping it for a hypergradient"
            x_val, y_val = self.source.val_batch(self.layout, self.wants, self.parallel.shard_validation)
            v, val_losses = self.parallel.validation_gradient(self.model, self.layout, x_val, y_val,
                                                              self.config.t_val)
            if self.online is not None:
                self.online.advance(self.taken, step)  # Z over the step, from what the step computed
                rows = self.online.hypergradient(self.layout, v)
            else:
                rows = greedy(self.taken, v, self.config.hypergrad_method)
            rows, val_losses = self.parallel.reduce(rows.detach(), val_losses)
            for r, value in enumerate(val_losses.tolist()):
                if self.wants[r]:
                    self.runs[r].history["val_loss"][-1] = value
            self.rows = rows.to(torch.float64).cpu()
        return self.rows

    def advance(self, step: int) -> None:
        """Each active strategy's lambda for step + 1, from its hypergradient where it asks for one."""
        for r, run in enumerate(self.runs):
            if run.failed is not None:
                continue

            def hypergradient(r: int = r, run: _Run = run) -> Tensor:
                if not self.wants[r]:
                    raise RuntimeError("the strategy asked for a hypergradient at a step where it said it would not")
                h = self.hypergradients(step)[r].clone()
                run.hypergrad_evals += 1
                if not bool(torch.isfinite(h).all()):
                    run.nonfinite += 1
                    if run.nonfinite > max(10, self.config.max_nonfinite_fraction * run.hypergrad_evals):
                        run.fail(f"{run.nonfinite} of {run.hypergrad_evals} hypergradients were not finite by "
                                 f"step {step} (non-finite validation data or losses?)", step)
                return h

            run.lam = run.strategy.advance(step, hypergradient)

    def evaluate(self, step: int) -> None:
        tests, vals = self.source.evaluate(self.model, self.layout, self.config.t_val)
        for run, test, val in zip(self.runs, tests, vals):
            if run.failed is None:
                run.evaluations.add(step, test, val, run.lam)

    def iterate(self, step: int, on_evaluation: Callable[[int, list[dict]], bool] | None = None) -> bool:
        """One iteration of the loop: the real step, each run's next lambda, the lr schedule and, where the
        schedule says, an evaluation; returns whether `on_evaluation` asked to stop."""
        self.take(step)
        self.advance(step)
        if self.schedule.ends_epoch(step):
            self.scheduler.step()
        if not self.schedule.evaluates(step):
            return False
        self.evaluate(step + 1)
        return on_evaluation is not None and on_evaluation(step + 1, [
            run.evaluations.points[-1] if run.evaluations.points else {} for run in self.runs])

    def wall(self) -> float:
        return self.earlier_wall + time.perf_counter() - self.started

    def state_dict(self, step: int) -> dict:
        return {"step": step + 1, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "wall_s": self.wall(),
                "online": None if self.online is None else self.online.state_dict(),
                "source": self.source.state_dict(),
                "runs": [{"strategy": run.strategy.state_dict(), "lam": list(run.lam.as_tuple()),
                          "history": run.history, "evals": run.evaluations.points,
                          "best": [run.evaluations.best_val, run.evaluations.test_at_best],
                          "hypergrad_evals": run.hypergrad_evals, "nonfinite": run.nonfinite, "failed": run.failed}
                         for run in self.runs]}

    def load_state_dict(self, state: dict) -> int:
        """Resume from `state`; returns the first step still to take."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.online is not None:
            self.online.load_state_dict(state["online"])
        self.source.load_state_dict(state["source"])
        for run, saved in zip(self.runs, state["runs"]):
            run.strategy.load_state_dict(saved["strategy"])
            run.lam = Metaparameters(*saved["lam"])
            run.history = saved["history"]
            run.evaluations = Evaluations(self.schedule.steps_per_epoch, saved["evals"], *saved["best"])
            run.hypergrad_evals, run.nonfinite = saved["hypergrad_evals"], saved["nonfinite"]
            run.failed = saved["failed"]
        self.earlier_wall = state["wall_s"]
        self.steps_done = state["step"]
        return state["step"]

    def outcomes(self) -> list[Outcome]:
        wall = self.wall()
        share = wall / len(self.runs)
        extra = {"batch_runs": len(self.runs), "batch_wall_s": wall} if self.layout.stacked else {}
        outcomes: list[Outcome] = []
        for r, run in enumerate(self.runs):
            if run.failed is not None:
                error = DivergenceError(run.failed["message"])
                error.wall_s, error.step, error.lam = share, run.failed["step"], tuple(run.failed["lam"])
                outcomes.append(error)
                continue
            final = run.evaluations.points[-1]
            outcomes.append(RunResult(
                method=run.strategy.name, seed=run.seed, final_test_acc=final["test_acc"],
                final_val_acc=final["val_acc"], best_val_acc=run.evaluations.best_val,
                test_acc_at_best_val=run.evaluations.test_at_best, final_lambda1=run.lam.lambda1,
                final_temperature=run.lam.temperature, steps=self.steps_done,
                hypergrad_evals=run.hypergrad_evals, full_trainings=1, wall_s=share,
                nonfinite_hypergrads=run.nonfinite, history=run.history, evals=run.evaluations.points,
                extra={**extra, **self.parallel.facts(), **self._online_facts(r)}))
        return outcomes

    def _online_facts(self, r: int) -> dict[str, int]:
        """How often run r's long-horizon tangents restarted from 0 (OnlineTangent), where it has them."""
        if self.online is None:
            return {}
        restarts = self.online.restarts
        return {"tangent_restarts": restarts[r] if r < len(restarts) else 0}


def checkpoint_identity(problem: Problem, strategies: list[Strategy], config: TrainConfig, seeds: list[int],
                        identity: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the caller's `identity`, and everything that determines the
    runs here (settings, strategies, seeds, the code version and a fingerprint of the data)."""
    data = {name: tensor_fingerprint(getattr(problem, name)) for name in
            ("x_train", "y_train", "teacher_train", "x_val", "y_val", "x_test", "y_test")}
    return {"identity": identity, "config": dataclasses.asdict(config), "seeds": list(seeds), "data": data,
            "strategies": [s.settings() for s in strategies], "code": code_version()}


def _load_checkpoint(path: Path | None, identity: dict[str, Any]) -> dict | None:
    """The checkpoint at `path` if it belongs to these runs, else None (a torn or foreign file is ignored)."""
    if path is None or not Path(path).exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file (torn, foreign, not weights-only) means: start again
        return None
    if not isinstance(saved, dict) or saved.get("identity") != identity:
        return None
    return saved


def _one_at_a_time(problem: Data, strategies: list[Strategy], config: TrainConfig, seeds: list[int],
                   progress: Progress | None, checkpoint: Path | None, identity: Any,
                   checkpoint_every_s: float) -> list[Outcome]:
    """The runs of a student that cannot be stacked, one after another through the same loop."""
    outcomes: list[Outcome] = []
    for index, (strategy, seed) in enumerate(zip(strategies, seeds)):
        path = None if checkpoint is None else Path(checkpoint).with_name(f"{Path(checkpoint).stem}_{seed}.ckpt")

        def report(step: int, total: int, done: int = index) -> None:
            if progress is not None:
                progress(done * total + step, len(seeds) * total)

        outcomes += train_runs(problem, [strategy], config, [seed], report, path, identity, checkpoint_every_s)
    return outcomes


def train_runs(problem: Data, strategies: list[Strategy], config: TrainConfig, seeds: list[int],
               progress: Progress | None = None, checkpoint: Path | None = None, identity: Any = None,
               checkpoint_every_s: float = 30.0, parallel: Parallel | None = None,
               on_evaluation: Callable[[int, list[dict]], bool] | None = None) -> list[Outcome]:
    """Train one run per seed (strategies[r] chooses run r's lambda); outcome r is its RunResult, or its
    DivergenceError when it diverged. Stackable students train together, others one at a time. `problem`
    is the data in memory (Problem: each run draws its own seeded batches) or loaders (Loaders: the
    loader's batches, the same for every run; a teacher module runs on each train batch).

    With `checkpoint`, the whole state is saved there (atomically, weights only) at the end of an epoch
    once `checkpoint_every_s` seconds have passed since the last save, and a checkpoint of these exact
    runs (`identity`, settings, strategies, seeds, data, code version) is resumed from, so an interrupted
    batch loses little. wall_s of each run is the wall time (summed over resumptions) divided by R.
    `on_evaluation(step, [each run's last evaluation point])` is called after every evaluation; when it
    returns True the runs stop there (a pruned trial, say), and their results count the steps taken.
    """
    if len(strategies) != len(seeds) or not seeds:
        raise ValueError("train_runs needs one strategy per seed, and at least one seed")
    if len({s.settings()["name"] for s in strategies}) != 1:
        raise ValueError("the runs trained together must use one method")
    if checkpoint is not None and isinstance(problem, Loaders):
        raise ValueError("runs from loaders cannot checkpoint (a loader's position cannot be saved); pass "
                         "checkpoint=None, or the data in memory as a Problem")
    try:
        engine = Engine(problem, strategies, config, seeds, parallel or Parallel())
    except NotImplementedError:  # a student that cannot be stacked
        return _one_at_a_time(problem, strategies, config, seeds, progress, checkpoint, identity, checkpoint_every_s)
    key = checkpoint_identity(problem, strategies, config, seeds, identity) if checkpoint is not None else None
    saved = _load_checkpoint(checkpoint, key) if key is not None else None
    first, last_saved = (engine.load_state_dict(saved) if saved is not None else 0), time.perf_counter()
    for step in range(first, engine.schedule.total_steps):
        stop = engine.iterate(step, on_evaluation)
        if (checkpoint is not None and engine.schedule.ends_epoch(step) and step + 1 < engine.schedule.total_steps
                and time.perf_counter() - last_saved >= checkpoint_every_s):
            buffer = io.BytesIO()
            torch.save({"identity": key, **engine.state_dict(step)}, buffer)
            write_atomic(Path(checkpoint), buffer.getvalue())
            last_saved = time.perf_counter()
        if progress is not None:
            progress(step + 1, engine.schedule.total_steps)
        engine.steps_done = step + 1
        if stop or all(run.failed is not None for run in engine.runs):
            break
    return engine.outcomes()


def fit(problem: Data, strategy: Strategy, config: TrainConfig, seed: int, progress: Progress | None = None
        ) -> RunResult:
    """Train a fresh student with `strategy` choosing lambda at every step; `seed` fixes its initial weights
    and data order. Raises DivergenceError when the training loss becomes non-finite (or the hypergradients
    are non-finite too often)."""
    outcome = train_runs(problem, [strategy], config, [seed], progress)[0]
    if isinstance(outcome, DivergenceError):
        raise outcome
    return outcome


def fit_batched(problem: Data, strategies: list[Strategy], config: TrainConfig, seeds: list[int],
                progress: Progress | None = None, checkpoint: Path | None = None, identity: Any = None,
                checkpoint_every_s: float = 30.0) -> list[Outcome]:
    """`fit` for R = len(seeds) runs at once (see `train_runs`); outcome r is run r's RunResult or its
    DivergenceError. Results equal R separate `fit` calls to float rounding."""
    return train_runs(problem, strategies, config, seeds, progress, checkpoint, identity, checkpoint_every_s)
