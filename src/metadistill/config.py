"""Typed experiment configuration: defaults, TOML presets per dataset, and `--set key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import torch

from . import strategies
from .hypergrad import HESSIANS
from .meta import LAMBDA1_BOUNDS, TEMPERATURE_BOUNDS, Metaparameters
from .optuna_search import PRUNERS
from .steps import HYPERGRADIENT_METHODS
from .teacher_models import TEACHERS
from .train import OPTIMIZERS, TrainConfig
from .updates import ADAM_UPDATES

DATASETS = ("synthetic", "fashion-mnist", "cifar10-reduced", "cifar10")
# Settings that say where things are or how fast they run, not what is computed: a finished run is
# reused whatever their values.
NOT_IDENTITY = ("threads", "batch_runs", "data_dir", "download", "cache_dir")
METHODS = ("no_distillation", "naive", "random", "gradient", "hyperopt", "proposed", "online", "proposed_online",
           "optuna", "pbt")
PAPER_METHODS = METHODS[:6]
DEFAULT_METHODS = METHODS[:8]  # what reproduce runs unless told; the optuna and pbt baselines are opt-in (--methods)
SEARCH_METHODS = ("optuna", "pbt")  # searches that run one run at a time, each its own trainings (never batched)
METHOD_HELP = {
    "no_distillation": "lambda1 = 1 (hard labels only)",
    "naive": "lambda1 = 0.5, T = 1, fixed (or --set lambda1=.. temperature=..)",
    "random": "lambda1 ~ U(0,1), log10 T ~ U(-1,1), fixed for the run",
    "gradient": "greedy hypergradient on lambda at every step",
    "hyperopt": "TPE over fixed lambda, hyperopt_trials trainings + 1 final",
    "proposed": "hypergradients in gradient windows, linear predictions in between",
    "online": "long-horizon (online) hypergradient on lambda at every step (gamma, hessian)",
    "proposed_online": "the proposed windows and predictions over the online hypergradient",
    "optuna": "Optuna TPE with a pruner over fixed lambda, in the step budget of optuna_budget trainings",
    "pbt": "Ray Tune population-based training of pbt_population members, exploit/explore every pbt_interval steps",
}
GRADIENT_METHODS = ("gradient", "proposed", "online", "proposed_online")
ONLINE_METHODS = ("online", "proposed_online")  # the methods of the online hypergradient (gamma, hessian)
# Settings that apply only to some methods (the others ignore them, and they are left out of those runs'
# identity): setting -> the methods it applies to.
METHOD_SETTINGS = {
    **{name: GRADIENT_METHODS for name in ("meta_optimizer", "meta_lr", "meta_clip", "meta_average",
                                           "max_nonfinite_fraction")},
    "predictor": ("proposed", "proposed_online"),
    "lambda1": ("naive", *GRADIENT_METHODS),
    "temperature": ("naive", *GRADIENT_METHODS),
    "hypergrad_method": ("gradient", "proposed"),
    "window": ("proposed", "proposed_online"),
    "period": ("proposed", "proposed_online"),
    "gamma": ONLINE_METHODS,
    "hessian": ONLINE_METHODS,
    "hyperopt_trials": ("hyperopt",),
    "optuna_budget": ("optuna",),
    "optuna_pruner": ("optuna",),
    "pbt_population": ("pbt",),
    "pbt_interval": ("pbt",),
}
SYNTHETIC_ONLY = ("teacher_steps",)
IMAGE_ONLY = ("subset", "teacher_arch", "teacher_epochs", "teacher_batch_size")
NAIVE = Metaparameters(0.5, 1.0)


def method_order(method: str) -> tuple[int, str]:
    """Sort key: the paper's row order, unknown names last."""
    return (METHODS.index(method) if method in METHODS else len(METHODS), method)
NO_DISTILLATION = Metaparameters(1.0, 1.0)


class ConfigError(ValueError):
    """A configuration value a user gave is unknown, malformed or out of range."""


@dataclass
class ExperimentConfig(TrainConfig):
    """Every setting of an experiment (the student's training ones are TrainConfig's); a preset per dataset
    fills it, `--set key=value` overrides it."""

    dataset: str = "synthetic"
    threads: int = 0  # torch intra-op threads; 0: torch's default. Tiny models run fastest on 1.
    batch_runs: int = 10  # runs of one method trained together as one stacked computation; 1: one at a time
    # metaparameters
    lambda1: float | None = None
    temperature: float | None = None
    hypergrad_method: str = "jvp"
    meta_optimizer: str = "sgd"
    meta_lr: float = 0.1
    meta_clip: float = 0.01
    meta_average: int = 1  # the meta-update uses the mean of the last meta_average hypergradients
    window: int = 10
    period: int = 2
    predictor: str = "line"  # proposed methods: how lambda is predicted between gradient windows (the paper: line)
    gamma: float = 0.99  # online methods: Z decays by gamma before every step (0: the greedy hypergradient)
    hessian: str = "exact"  # online methods: carry Z through each step's curvature ("exact") or not ("identity")
    hyperopt_trials: int = 5
    optuna_budget: float = 6.0  # the optuna baseline's budget in full trainings' student steps (hyperopt's: 5 + 1)
    optuna_pruner: str = "median"  # median or halving (successive halving)
    pbt_population: int = 4  # the pbt baseline's members
    pbt_interval: int = 0  # student steps between its exploit/explore decisions; 0: the evaluation interval
    # data and teacher
    data_seed: int = 0  # synthetic data draw; seed of the teacher's training
    subset: int = 0  # image datasets: 0 = all; N = first N train, N // 4 validation, N // 2 test images
    data_dir: str = ""  # image datasets: where the official files are ("" = search $METADISTILL_DATA, ...)
    download: bool = False
    cache_dir: str = ""  # trained teachers ("" = $METADISTILL_CACHE or ~/.cache/metadistill)
    teacher_arch: str = ""
    teacher_epochs: int = 0
    teacher_batch_size: int = 128
    teacher_steps: int = 20000  # synthetic teacher: full-batch gradient-descent steps
    teacher_lr: float = 0.01

    def validate(self) -> ExperimentConfig:
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        for name, value, (low, high) in (("lambda1", self.lambda1, LAMBDA1_BOUNDS),
                                         ("temperature", self.temperature, TEMPERATURE_BOUNDS)):
            if value is not None and not (math.isfinite(value) and low <= value <= high):
                raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")
        checks = [
            (self.meta_optimizer in strategies.META_OPTIMIZERS,
             f"meta_optimizer must be one of {', '.join(strategies.META_OPTIMIZERS)}"),
            (math.isfinite(self.meta_lr) and self.meta_lr > 0, f"meta_lr must be > 0, got {self.meta_lr}"),
            (math.isfinite(self.meta_clip) and self.meta_clip >= 0, "meta_clip must be >= 0 (0: no clip)"),
            (self.window >= 2, f"window must be >= 2, got {self.window}"),
            (self.meta_average >= 1, f"meta_average must be >= 1, got {self.meta_average}"),
            (math.isfinite(self.gamma) and 0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}"),
            (self.hessian in HESSIANS, f"hessian must be one of {', '.join(HESSIANS)}"),
            (self.period >= 1, f"period must be >= 1, got {self.period}"),
            (self.hyperopt_trials >= 1, f"hyperopt_trials must be >= 1, got {self.hyperopt_trials}"),
            (math.isfinite(self.optuna_budget) and self.optuna_budget >= 1,
             f"optuna_budget must be >= 1 (full trainings), got {self.optuna_budget}"),
            (self.pbt_population >= 2, f"pbt_population must be >= 2, got {self.pbt_population}"),
            (self.pbt_interval >= 0, f"pbt_interval must be >= 0 (0: each evaluation), got {self.pbt_interval}"),
            (self.teacher_steps >= 1, "teacher_steps must be >= 1"),
            (math.isfinite(self.teacher_lr) and self.teacher_lr > 0, "teacher_lr must be > 0"),
            (self.data_seed >= 0, "data_seed must be >= 0"),
            (self.subset >= 0, "subset must be >= 0 (0: the whole dataset)"),
            (self.teacher_epochs >= 0, "teacher_epochs must be >= 0"),
            (self.teacher_batch_size >= 1, "teacher_batch_size must be >= 1"),
            (self.threads >= 0, "threads must be >= 0 (0: torch's default)"),
            (self.batch_runs >= 1, "batch_runs must be >= 1 (1: one run at a time)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"device must be a torch device (cpu, cuda, cuda:1), got {self.device!r}") from None
        if self.dataset != "synthetic":
            if self.teacher_arch not in TEACHERS:
                raise ConfigError(f"teacher_arch must be one of {', '.join(TEACHERS)}, got {self.teacher_arch!r}")
            if self.teacher_epochs < 1:
                raise ConfigError("teacher_epochs must be >= 1")
        return self

    def train_config(self) -> TrainConfig:
        names = {f.name for f in fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def meta_optimizer_instance(self) -> strategies.MetaOptimizer:
        return strategies.MetaOptimizer(self.meta_optimizer, self.meta_lr, self.meta_clip, self.meta_average)

    def strategy(self, method: str) -> strategies.Strategy:
        """The strategy of `method` (every method but the searches hyperopt, optuna and pbt, which run whole
        trainings)."""
        init = (self.lambda1, self.temperature)
        horizon = strategies.Horizon(self.gamma, self.hessian)
        if method == "no_distillation":
            return strategies.Fixed(NO_DISTILLATION, method)
        if method == "naive":
            return strategies.Fixed(Metaparameters(NAIVE.lambda1 if self.lambda1 is None else self.lambda1,
                                        NAIVE.temperature if self.temperature is None else self.temperature), method)
        if method == "random":
            return strategies.Random()
        if method == "gradient":
            return strategies.Gradient(self.meta_optimizer_instance(), *init)
        if method == "online":
            return strategies.Online(self.meta_optimizer_instance(), *init, horizon)
        if method in ("proposed", "proposed_online"):
            return strategies.LinearTrajectory(self.window, self.period, self.meta_optimizer_instance(), *init,
                                    horizon if method == "proposed_online" else None, method, self.predictor)
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")

    def ignored(self, method: str) -> list[str]:
        """The settings `method` does not use on this dataset (they are left out of its runs' identity)."""
        names = [name for name, methods in METHOD_SETTINGS.items() if method not in methods]
        names += IMAGE_ONLY if self.dataset == "synthetic" else SYNTHETIC_ONLY
        if self.optimizer != "sgd":
            names.append("momentum")
        if self.optimizer != "adam" or method not in GRADIENT_METHODS:
            names.append("adam_update")
        if self.meta_optimizer != "sgd" and "meta_clip" not in names:
            names.append("meta_clip")
        return names


_CHOICES = {"optimizer": OPTIMIZERS, "predictor": strategies.PREDICTORS, "meta_optimizer": strategies.META_OPTIMIZERS,
            "hessian": HESSIANS, "optuna_pruner": PRUNERS,
            "hypergrad_method": HYPERGRADIENT_METHODS, "dataset": DATASETS, "adam_update": ADAM_UPDATES}


def _parse(name: str, kind: Any, text: str) -> Any:
    kind = str(kind)
    if "None" in kind and text.strip().lower() in ("none", ""):
        return None
    try:
        if kind.startswith("bool"):
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        expected = kind.split(" |")[0]
        raise ConfigError(f"{name} expects a {expected}, got {text!r}") from None
    if name in _CHOICES and text not in _CHOICES[name]:
        raise ConfigError(f"{name} must be one of {', '.join(_CHOICES[name])}, got {text!r}")
    return text


def preset(dataset: str, quick: bool = False) -> dict[str, Any]:
    """The paper's settings for `dataset` from presets/<dataset>.toml; with `quick`, its [quick] table
    (a small subset, 1-2 epochs) on top. The key "runs" is the default number of runs."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    text = resources.files("metadistill").joinpath("presets", f"{dataset}.toml").read_text()
    table = tomllib.loads(text)
    quick_table = table.pop("quick", {})
    return {**table, **quick_table} if quick else table


def build_config(dataset: str, overrides: list[str] | None = None, quick: bool = False) -> ExperimentConfig:
    """Defaults, then the dataset's preset (quick or not), then `key=value` overrides; validated."""
    known = {f.name: f.type for f in fields(ExperimentConfig)}
    values: dict[str, Any] = {"dataset": dataset}
    for key, value in preset(dataset, quick).items():
        if key != "runs":
            values[key] = value
    for item in overrides or []:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}; known settings: {', '.join(sorted(known))}")
        if key == "dataset":
            raise ConfigError("choose the dataset with --dataset, not --set")
        values[key] = _parse(key, known[key], text)
    try:
        config = ExperimentConfig(**values)
    except ValueError as error:  # TrainConfig's own checks
        raise ConfigError(str(error)) from None
    return config.validate()


def require_device(device: str) -> None:
    """Refuse, with one clear message, a cuda device this machine does not have."""
    where = torch.device(device)
    if where.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                          "use --device cpu")
    count = torch.cuda.device_count()
    if where.index is not None and where.index >= count:
        raise ConfigError(f"device {device!r}: this machine has {count} CUDA GPU(s), numbered from 0")


def setting_names() -> list[str]:
    return [f.name for f in fields(ExperimentConfig)]
