"""metadistill: gradient-based tuning of knowledge-distillation metaparameters (lambda1, T)."""

from .distiller import MetaDistiller
from .engine import evaluate, fit, fit_batched, train_runs
from .hypergrad import HYPERGRADIENT_METHODS, OnlineTangent, greedy_hypergradient, unrolled_hypergradient
from .identity import PACKAGE_VERSION
from .losses import distillation_loss, mixed_derivative, validation_loss
from .meta import Metaparameters
from .optuna_search import optuna_search
from .pbt import pbt_search
from .problem import Loaders, Problem
from .results import DivergenceError, RunResult
from .search import hyperopt_search, hyperopt_search_batched
from .steps import TakenStep, take_step
from .strategies import (
    Fixed,
    Gradient,
    Horizon,
    LinearTrajectory,
    MetaOptimizer,
    Online,
    Random,
    Strategy,
    random_metaparameters,
)
from .train import TrainConfig
from .updates import UpdateMap

__version__ = PACKAGE_VERSION

__all__ = [
    "HYPERGRADIENT_METHODS",
    "DivergenceError",
    "Horizon",
    "Loaders",
    "Fixed",
    "Gradient",
    "LinearTrajectory",
    "MetaDistiller",
    "MetaOptimizer",
    "Metaparameters",
    "Online",
    "OnlineTangent",
    "Problem",
    "Random",
    "RunResult",
    "Strategy",
    "TakenStep",
    "TrainConfig",
    "UpdateMap",
    "distillation_loss",
    "evaluate",
    "fit",
    "fit_batched",
    "greedy_hypergradient",
    "hyperopt_search",
    "hyperopt_search_batched",
    "mixed_derivative",
    "optuna_search",
    "pbt_search",
    "random_metaparameters",
    "take_step",
    "train_runs",
    "unrolled_hypergradient",
    "validation_loss",
]
