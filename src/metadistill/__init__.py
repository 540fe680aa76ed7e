"""metadistill: gradient-based tuning of knowledge-distillation metaparameters (lambda1, T)."""

from .hypergrad import HYPERGRADIENT_METHODS, UpdateMap, greedy_hypergradient
from .losses import distillation_loss, mixed_derivative, validation_loss
from .meta import Metaparameters

__version__ = "0.1.0"

__all__ = [
    "HYPERGRADIENT_METHODS",
    "Metaparameters",
    "UpdateMap",
    "distillation_loss",
    "greedy_hypergradient",
    "mixed_derivative",
    "validation_loss",
]
