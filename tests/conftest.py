"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture
def float64():
    """Oracle comparisons run in float64; the default dtype is restored for the other tests.
    A module opts in for all its tests with `pytestmark = pytest.mark.usefixtures("float64")`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
