"""Distillation metaparameters (lambda1, T): bounds, validation, clamping, unconstrained coordinates."""

from __future__ import annotations

import math
from dataclasses import dataclass

LAMBDA1_BOUNDS = (0.0, 1.0)
TEMPERATURE_BOUNDS = (0.1, 10.0)
# logit(lambda1) is finite only inside (0, 1); keep the unconstrained coordinate finite at the bounds.
_LOGIT_EPS = 1e-6


@dataclass(frozen=True)
class Metaparameters:
    """lambda1 weights the hard-label cross-entropy, (1 - lambda1) the distillation term; T is the temperature.

    lambda1 = 1 is training without distillation. Both values are plain floats; out-of-range or
    non-finite values raise ValueError (use `Metaparameters.clamped` to project instead).
    """

    lambda1: float
    temperature: float

    def __post_init__(self) -> None:
        for name, value, (low, high) in (
            ("lambda1", self.lambda1, LAMBDA1_BOUNDS),
            ("temperature", self.temperature, TEMPERATURE_BOUNDS),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
        object.__setattr__(self, "lambda1", float(self.lambda1))
        object.__setattr__(self, "temperature", float(self.temperature))

    @classmethod
    def clamped(cls, lambda1: float, temperature: float) -> Metaparameters:
        """Project onto the bounds; a non-finite coordinate is an error, never silently clamped."""
        if not (math.isfinite(lambda1) and math.isfinite(temperature)):
            raise ValueError(f"non-finite metaparameters: lambda1={lambda1}, temperature={temperature}")
        return cls(
            min(max(float(lambda1), LAMBDA1_BOUNDS[0]), LAMBDA1_BOUNDS[1]),
            min(max(float(temperature), TEMPERATURE_BOUNDS[0]), TEMPERATURE_BOUNDS[1]),
        )

    def to_unconstrained(self) -> tuple[float, float]:
        """(logit lambda1, log T): coordinates in which an unconstrained optimizer can move freely."""
        p = min(max(self.lambda1, _LOGIT_EPS), 1.0 - _LOGIT_EPS)
        return math.log(p / (1.0 - p)), math.log(self.temperature)

    @classmethod
    def from_unconstrained(cls, logit_lambda1: float, log_temperature: float) -> Metaparameters:
        lambda1 = 1.0 / (1.0 + math.exp(-min(max(logit_lambda1, -50.0), 50.0)))
        return cls.clamped(lambda1, math.exp(min(max(log_temperature, -50.0), 50.0)))

    def as_tuple(self) -> tuple[float, float]:
        return self.lambda1, self.temperature
