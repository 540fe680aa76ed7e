"""metadistill: gradient-based tuning of knowledge-distillation metaparameters (lambda1, T)."""

from .batched import fit_batched
from .hypergrad import HYPERGRADIENT_METHODS, UpdateMap, greedy_hypergradient
from .losses import distillation_loss, mixed_derivative, validation_loss
from .meta import Metaparameters
from .search import hyperopt_search, hyperopt_search_batched
from .strategies import Fixed, Gradient, LinearTrajectory, MetaOptimizer, Random, Strategy, random_metaparameters
from .train import DivergenceError, Problem, RunResult, TakenStep, TrainConfig, evaluate, fit, train_step

__version__ = "0.1.0"

__all__ = [
    "HYPERGRADIENT_METHODS",
    "DivergenceError",
    "Fixed",
    "Gradient",
    "LinearTrajectory",
    "MetaOptimizer",
    "Metaparameters",
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
    "random_metaparameters",
    "train_step",
    "validation_loss",
]
