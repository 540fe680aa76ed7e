"""Fixtures shared by the test modules."""

import subprocess
import sys

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


@pytest.fixture
def cli_without_ray():
    """`run(args)`: metadistill's CLI main(args) in a fresh interpreter in which ray cannot be imported, as if it
    were not installed; returns (exit code, stderr lines)."""
    def run(args: list[str]) -> tuple[int, list[str]]:
        code = f"import sys; sys.modules['ray'] = None; from metadistill.cli import main; sys.exit(main({args!r}))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        return done.returncode, done.stderr.strip().splitlines()

    return run
