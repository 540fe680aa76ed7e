"""Fixtures shared by the test modules."""

import os
import subprocess
import sys

import pytest
import torch

# The tests train tiny models on tiny data, which gain little from several intra-op threads; beside other busy
# processes those threads wait for a core at every operation (an 8-step fit of the CNN test student took 2-12 s
# with 2 threads against 0.1-0.3 s with 1, beside two training runs). The commands the tests start inherit the
# setting through OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


@pytest.fixture
def tape_and_forward_mode():
    """`compare(model, x)`: the model's logits on x and the JVP of the logits in random tangents, by the recorded
    tape (metadistill.jvp.tape_jvp) and by forward-mode autograd (generic_jvp): (logits, tape, primal, expected),
    after checking that the tape recorded the whole chain from x to the logits."""
    from metadistill.jvp import generic_jvp, record_activations, tape_jvp

    def compare(model: torch.nn.Module, x: torch.Tensor) -> tuple:
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        tangents = {n: torch.randn_like(p) for n, p in params.items()}
        with record_activations(model) as record:
            logits = model(x)
        assert record.chain(x, logits)
        primal, expected = generic_jvp(model, params, buffers, x, tangents)
        return logits, tape_jvp(record, params, buffers, tangents), primal, expected

    return compare
