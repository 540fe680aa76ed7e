"""Metaparameter strategies behind one protocol: fixed, random, greedy gradient, linear trajectory.

The training loop asks a strategy for lambda at the start (`start`), and after every real step t
calls `advance(t, hypergradient)` to get lambda for step t + 1. `hypergradient` is a lazy callable:
the loop computes (and counts) the hypergradient of step t only if the strategy calls it, and it
prepares for that only where `wants_hypergradient(t)` is true.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from .hypergrad import HESSIANS
from .meta import Metaparameters

Hypergradient = Callable[[], Tensor]
META_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Horizon:
    """The long-horizon (online) hypergradient's settings: Z = dw/dlambda is multiplied by `gamma` before every
    step (0: the greedy hypergradient, 1: the whole trajectory so far), and `hessian` says whether Z is carried
    through each step's curvature ("exact") or not ("identity"). See hypergrad.OnlineTangent."""

    gamma: float = 0.99
    hessian: str = "exact"

    def __post_init__(self) -> None:
        if not (isinstance(self.gamma, (int, float)) and 0.0 <= self.gamma <= 1.0):
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma!r}")
        if self.hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {', '.join(HESSIANS)}, got {self.hessian!r}")


def random_metaparameters(seed: int | list[int]) -> Metaparameters:
    """The run's random draw: lambda1 ~ U(0, 1), log10 T ~ U(-1, 1); the same for every method of run `seed`
    (a list of ints seeds a draw of its own: the pbt method's member k of run s draws with [s, k])."""
    rng = np.random.default_rng(seed)
    lambda1, log10_t = rng.uniform(0.0, 1.0), rng.uniform(-1.0, 1.0)
    return Metaparameters.clamped(float(lambda1), float(10.0**log10_t))


class Strategy:
    """Base protocol. Subclasses set `name` and override what they need."""

    name = "strategy"
    uses_hypergradient = False

    def __init__(self) -> None:
        self.lam: Metaparameters | None = None

    def start(self, seed: int) -> Metaparameters:
        raise NotImplementedError

    def wants_hypergradient(self, step: int) -> bool:
        return False

    def advance(self, step: int, hypergradient: Hypergradient) -> Metaparameters:
        assert self.lam is not None, "start() first"
        return self.lam

    def settings(self) -> dict:
        """What determines the strategy's choices (its name and settings; not its state)."""
        return {"name": self.name}

    def state_dict(self) -> dict:
        return {"lam": None if self.lam is None else self.lam.as_tuple()}

    def load_state_dict(self, state: dict) -> None:
        self.lam = None if state["lam"] is None else Metaparameters(*state["lam"])


class Fixed(Strategy):
    """Constant metaparameters for the whole run (no distillation: lambda1 = 1; naive: 0.5, T = 1)."""

    def __init__(self, lam: Metaparameters, name: str = "fixed") -> None:
        super().__init__()
        self.fixed = lam
        self.name = name

    def start(self, seed: int) -> Metaparameters:
        self.lam = self.fixed
        return self.lam

    def settings(self) -> dict:
        return {"name": self.name, "lam": list(self.fixed.as_tuple())}


class Random(Strategy):
    """The run's random draw (`random_metaparameters(seed)`), fixed for the run."""

    name = "random"

    def start(self, seed: int) -> Metaparameters:
        self.lam = random_metaparameters(seed)
        return self.lam


class MetaOptimizer:
    """Update of lambda from a hypergradient h = [dL_val/dlambda1, dL_val/dT].

    "sgd" (the paper): each component of h clipped to [-clip, clip] (clip <= 0 disables it),
    non-finite components set to 0, lambda -= meta_lr * h, then clamped to the bounds.
    "adam": Adam on the unconstrained coordinates (logit lambda1, log T), no clip; non-finite
    components of h set to 0.
    `average` k > 1 uses the mean of the last k hypergradients (after the non-finite ones are zeroed)
    instead of the last one alone: a moving average that smooths minibatch noise.
    """

    def __init__(self, kind: str = "sgd", meta_lr: float = 0.1, clip: float = 0.01, average: int = 1) -> None:
        if kind not in META_OPTIMIZERS:
            raise ValueError(f"unknown meta optimizer {kind!r}; choose one of {', '.join(META_OPTIMIZERS)}")
        if not (math.isfinite(meta_lr) and meta_lr > 0):
            raise ValueError(f"meta_lr must be a positive number, got {meta_lr}")
        if not (isinstance(average, int) and average >= 1):
            raise ValueError(f"average must be an integer >= 1, got {average!r}")
        self.kind, self.meta_lr, self.clip, self.average = kind, float(meta_lr), float(clip), average
        self.coords: Tensor | None = None
        self.adam: torch.optim.Adam | None = None
        self.recent: list[list[float]] = []

    def coordinates(self, lam: Metaparameters) -> tuple[float, float]:
        """The coordinates this meta-optimizer moves lambda in: (lambda1, T), or (logit lambda1, log T) for Adam."""
        return lam.as_tuple() if self.kind == "sgd" else lam.to_unconstrained()

    def from_coordinates(self, values: tuple[float, float]) -> Metaparameters:
        """Metaparameters at `coordinates` values, inside the bounds (clamped; strictly inside for Adam)."""
        return Metaparameters.clamped(*values) if self.kind == "sgd" else Metaparameters.from_unconstrained(*values)

    def reset(self, lam: Metaparameters) -> None:
        if self.kind == "adam":
            self.coords = torch.tensor(lam.to_unconstrained(), dtype=torch.float64, requires_grad=True)
            self.adam = torch.optim.Adam([self.coords], lr=self.meta_lr)

    def update(self, lam: Metaparameters, hypergradient: Tensor) -> Metaparameters:
        h = torch.nan_to_num(hypergradient.detach().to(torch.float64).cpu(), nan=0.0, posinf=0.0, neginf=0.0)
        if self.average > 1:
            self.recent = [*self.recent, h.tolist()][-self.average:]
            h = torch.tensor(self.recent, dtype=torch.float64).mean(0)
        if self.kind == "sgd":
            if self.clip > 0:
                h = h.clamp(-self.clip, self.clip)
            return Metaparameters.clamped(lam.lambda1 - self.meta_lr * float(h[0]),
                                          lam.temperature - self.meta_lr * float(h[1]))
        assert self.coords is not None and self.adam is not None, "reset() first"
        with torch.no_grad():  # follow lambda where it moved without us (predictions, clamping)
            self.coords.copy_(torch.tensor(lam.to_unconstrained(), dtype=torch.float64))
        # Chain rule to (logit lambda1, log T): dlambda1/dlogit = lambda1 (1 - lambda1), dT/dlogT = T. At a
        # bound lambda1 (1 - lambda1) is 0 and lambda1 could never leave it: take it just inside the bound.
        inside = min(max(lam.lambda1, 1e-6), 1.0 - 1e-6)
        jac = torch.tensor([inside * (1.0 - inside), lam.temperature], dtype=torch.float64)
        self.coords.grad = h * jac
        self.adam.step()
        return Metaparameters.from_unconstrained(*self.coords.detach().tolist())

    def settings(self) -> dict:
        return {"kind": self.kind, "meta_lr": self.meta_lr, **({"clip": self.clip} if self.kind == "sgd" else {}),
                **({"average": self.average} if self.average > 1 else {})}

    def state_dict(self) -> dict:
        recent = {"recent": self.recent} if self.average > 1 else {}
        if self.kind == "sgd":
            return recent
        assert self.coords is not None and self.adam is not None
        return {"coords": self.coords.detach().tolist(), "adam": self.adam.state_dict(), **recent}

    def load_state_dict(self, state: dict) -> None:
        self.recent = [list(h) for h in state.get("recent", [])]
        if self.kind == "adam":
            self.coords = torch.tensor(state["coords"], dtype=torch.float64, requires_grad=True)
            self.adam = torch.optim.Adam([self.coords], lr=self.meta_lr)
            self.adam.load_state_dict(state["adam"])


class Gradient(Strategy):
    """A hypergradient step on lambda after every training step: the greedy (one-step) hypergradient, or
    with a `horizon` the online one (see Horizon).

    Starts from `lambda1` = 0.5 and `temperature` = 1 unless told otherwise; None means the run's random
    draw (`random_metaparameters(seed)`, the paper's convention, which `metadistill reproduce` follows).
    """

    name = "gradient"
    uses_hypergradient = True

    def __init__(self, meta: MetaOptimizer | None = None, lambda1: float | None = 0.5,
                 temperature: float | None = 1.0, horizon: Horizon | None = None, name: str | None = None) -> None:
        super().__init__()
        self.horizon = horizon
        self.name = name or self.name
        self.meta = meta or MetaOptimizer()
        self.init = (lambda1, temperature)
        if lambda1 is not None or temperature is not None:
            Metaparameters(lambda1 if lambda1 is not None else 0.5,
                           temperature if temperature is not None else 1.0)  # validates the given ones

    def start(self, seed: int) -> Metaparameters:
        draw = random_metaparameters(seed)
        lambda1, temperature = self.init
        self.lam = Metaparameters(draw.lambda1 if lambda1 is None else lambda1,
                                  draw.temperature if temperature is None else temperature)
        self.meta.reset(self.lam)
        return self.lam

    def wants_hypergradient(self, step: int) -> bool:
        return True

    def advance(self, step: int, hypergradient: Hypergradient) -> Metaparameters:
        assert self.lam is not None, "start() first"
        self.lam = self.meta.update(self.lam, hypergradient())
        return self.lam

    def settings(self) -> dict:
        horizon = None if self.horizon is None else asdict(self.horizon)
        return {"name": self.name, "meta": self.meta.settings(), "init": list(self.init), "horizon": horizon}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "meta": self.meta.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.meta.load_state_dict(state["meta"])


class Online(Gradient):
    """lambda follows the long-horizon (online) hypergradient after every step (Franceschi et al. 2017,
    real-time hyperparameter optimisation): Z = dw/dlambda is carried along the real trajectory, decayed by
    `horizon.gamma` before each step; the hypergradient is grad L_val(w)^T Z. Z ignores lambda's own earlier
    changes (the real-time approximation). gamma = 0 is `Gradient` exactly."""

    name = "online"

    def __init__(self, meta: MetaOptimizer | None = None, lambda1: float | None = 0.5,
                 temperature: float | None = 1.0, horizon: Horizon | None = None, name: str | None = None) -> None:
        super().__init__(meta, lambda1, temperature, horizon or Horizon(), name)


PREDICTORS = ("line", "hold", "line_long", "quadratic", "damped")
LONG_WINDOWS = 3  # "line_long": the line over the recorded values of this many gradient windows
DAMPING = 0.9  # "damped": the trend's weight decays by this factor per predicted step


def fit_predictor(kind: str, history: list[list[tuple[float, float]]], window: int, period: int) -> list[list[float]]:
    """The fitted predictor per metaparameter from the recorded values of the last gradient windows (`history`,
    oldest first, each the `window` values recorded at positions z = 0..m-1 of its cycle; earlier cycles sit
    at z - k * period * window). Evaluate it with `predict`.

    - line (the paper's): least-squares line over the last window;
    - hold: the last recorded value;
    - line_long: least-squares line over the last LONG_WINDOWS windows;
    - quadratic: least-squares parabola over the last window;
    - damped: the last value plus the last window's slope, damped by DAMPING per step (Gardner's damped trend).
    """
    if kind not in PREDICTORS:
        raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, got {kind!r}")
    last = np.asarray(history[-1], dtype=np.float64)
    z = np.arange(window, dtype=np.float64)
    if kind == "line":
        return [[float(c) for c in np.polyfit(z, last[:, i], 1)] for i in range(2)]
    if kind == "hold":
        return [[float(last[-1, i])] for i in range(2)]
    if kind == "quadratic":
        return [[float(c) for c in np.polyfit(z, last[:, i], 2)] for i in range(2)]
    if kind == "damped":
        return [[float(last[-1, i]), float(np.polyfit(z, last[:, i], 1)[0])] for i in range(2)]
    windows = history[-LONG_WINDOWS:]
    xs = np.concatenate([z - (len(windows) - 1 - k) * window * period for k in range(len(windows))])
    values = np.concatenate([np.asarray(w, dtype=np.float64) for w in windows])
    return [[float(c) for c in np.polyfit(xs, values[:, i], 1)] for i in range(2)]


def predict(kind: str, fitted: list[list[float]], z: int, window: int) -> tuple[float, float]:
    """The predictor's value at position z of the cycle (z = m .. period * m - 1 in a prediction window)."""
    if kind == "damped":
        ahead = z - (window - 1)
        gain = sum(DAMPING**i for i in range(1, ahead + 1))
        return fitted[0][0] + fitted[0][1] * gain, fitted[1][0] + fitted[1][1] * gain
    return float(np.polyval(fitted[0], z)), float(np.polyval(fitted[1], z))


class LinearTrajectory(Gradient):
    """The proposed method: hypergradients in gradient windows, predictions (the paper: lines) in between.

    On a global step counter, steps form windows of `window` (m) steps; window k is a gradient
    window when k % period == 0. There lambda follows the hypergradient, and the value after each
    update is recorded at z = 0..m-1. At the end of the window a predictor per metaparameter is fitted
    (`fit_predictor`; the paper's is a degree-1 least-squares line over z); in the (period - 1)
    following windows lambda is its value at z = m, m + 1, ..., period*m - 1, with no hypergradient.
    Values are recorded and predicted in the meta-optimizer's coordinates (lambda1 and T, clamped to
    the bounds, for "sgd"; logit lambda1 and log T for "adam", so that a prediction never sticks at a
    bound). The next gradient window starts from the last predicted value.
    """

    name = "proposed"

    def __init__(self, window: int = 10, period: int = 2, meta: MetaOptimizer | None = None,
                 lambda1: float | None = 0.5, temperature: float | None = 1.0, horizon: Horizon | None = None,
                 name: str | None = None, predictor: str = "line") -> None:
        super().__init__(meta, lambda1, temperature, horizon, name)
        if not (isinstance(window, int) and window >= (3 if predictor == "quadratic" else 2)):
            raise ValueError(f"window must be an integer >= 2 (a line needs two points; a parabola 3), got {window}")
        if not (isinstance(period, int) and period >= 1):
            raise ValueError(f"period must be an integer >= 1, got {period}")
        if predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, got {predictor!r}")
        self.window, self.period, self.predictor = window, period, predictor
        self.recorded: list[tuple[float, float]] = []
        self.history: list[list[tuple[float, float]]] = []  # the last windows' recorded values
        self.line: list[list[float]] | None = None  # the fitted predictor, per metaparameter

    def is_gradient_step(self, step: int) -> bool:
        return (step // self.window) % self.period == 0

    def wants_hypergradient(self, step: int) -> bool:
        return self.is_gradient_step(step)

    def advance(self, step: int, hypergradient: Hypergradient) -> Metaparameters:
        assert self.lam is not None, "start() first"
        position = step % self.window
        if self.is_gradient_step(step):
            if position == 0:
                self.recorded = []
            self.lam = self.meta.update(self.lam, hypergradient())
            self.recorded.append(self.meta.coordinates(self.lam))
            if position == self.window - 1:
                self.history = [*self.history, list(self.recorded)][-LONG_WINDOWS:]
                self.line = fit_predictor(self.predictor, self.history, self.window, self.period)
        if self.is_gradient_step(step + 1):
            return self.lam
        assert self.line is not None
        # Step step + 1 is in a prediction window: z = its position in the cycle of period * m steps,
        # which runs m, m + 1, ..., period * m - 1 after the m recorded points.
        z = (step + 1) % (self.window * self.period)
        self.lam = self.meta.from_coordinates(predict(self.predictor, self.line, z, self.window))
        return self.lam

    def settings(self) -> dict:
        extra = {} if self.predictor == "line" else {"predictor": self.predictor}
        return {**super().settings(), "window": self.window, "period": self.period, **extra}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "recorded": list(self.recorded), "history": self.history, "line": self.line}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.recorded = [tuple(v) for v in state["recorded"]]
        self.history = [[tuple(v) for v in w] for w in state.get("history", [])]
        self.line = None if state["line"] is None else [list(v) for v in state["line"]]
