"""The logits JVP of the hypergradient is exact on every model, whichever engine takes it.

Each case takes one training step as the loop does (weights and buffers kept before it, RNG state
captured, forward pass recorded, backward, optimizer step), asks `logits_jvp` for J_z u as the loop
does, and compares it with an oracle written independently here: J u = d/dv <J^T v, u> by double
backward through `functional_call` at the kept weights, from the step's RNG state. Where it matters,
the engine is asserted too: the tape only for chains it can prove, the generic engine otherwise.
"""

import itertools
import threading
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from metadistill import jvp
from metadistill.jvp import ActivationRecord, capture_rng, jvp_kernels, logits_jvp, record_activations, uses_tape
from metadistill.models import fashion_student
from metadistill.stacked import stack_models


@pytest.fixture(autouse=True)
def float64():
    """float64 for the 1e-8 comparisons, and one thread (the models are tiny: on a busy machine, thread
    synchronisation would cost far more than the work); both restored for the other test modules."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def oracle(model: nn.Module, params: dict, buffers: dict, x: Tensor, tangents: dict,
           rng_state: Tensor | None = None) -> Tensor:
    """J_z u at `params` by double backward (reverse over reverse), from the CPU RNG state `rng_state`."""
    names = [n for n in params if n in tangents]
    leaves = {n: p.detach().clone().requires_grad_(n in tangents) for n, p in params.items()}
    scratch = {n: b.detach().clone() for n, b in buffers.items()}
    with torch.random.fork_rng(devices=[]), sdpa_kernel(SDPBackend.MATH):
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        z = functional_call(model, (leaves, scratch), (x,))
    v = torch.zeros_like(z, requires_grad=True)
    grads = torch.autograd.grad(z, [leaves[n] for n in names], grad_outputs=v, create_graph=True)
    pairs = [(g, tangents[n]) for g, n in zip(grads, names) if g.requires_grad]
    return torch.autograd.grad([g for g, _ in pairs], v, grad_outputs=[u for _, u in pairs])[0]


def rel_error(got: Tensor, expected: Tensor) -> float:
    assert got.shape == expected.shape
    scale = float(expected.detach().norm())
    assert scale > 1e-6  # not a comparison between two zeros
    return float((got - expected).detach().norm()) / scale


@dataclass
class Step:
    model: nn.Module
    x: Tensor
    params: dict
    buffers: dict
    tangents: dict
    record: ActivationRecord
    logits: Tensor
    rng: object
    rng_state: Tensor

    def jvp(self, **kwargs) -> tuple[Tensor, Tensor]:
        return logits_jvp(self.model, self.params, self.buffers, self.x, self.tangents, self.record, self.logits,
                          **kwargs)

    def oracle(self) -> Tensor:
        return oracle(self.model, self.params, self.buffers, self.x, self.tangents, self.rng_state)

    def on_tape(self) -> bool:
        """Whether `logits_jvp` takes the tape (it checks `record.chain`, then the weights' names)."""
        return uses_tape(self.record, self.x, self.logits, self.params, self.buffers, self.tangents)


def take_step(model: nn.Module, x: Tensor, kernels: bool = False, backward: bool = True) -> Step:
    """One SGD step as the loop takes it, and random tangents over the trainable weights."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    rng_state = torch.get_rng_state()
    rng = capture_rng(x.device)
    with jvp_kernels() if kernels else nullcontext(), record_activations(model) as record:
        logits = model(x)
    if backward:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.1)
        optimizer.zero_grad()
        logits.square().mean().backward()
        optimizer.step()
    generator = torch.Generator().manual_seed(1)
    tangents = {n: torch.randn(p.shape, generator=generator) for n, p in model.named_parameters() if p.requires_grad}
    return Step(model, x, params, buffers, tangents, record, logits, rng, rng_state)


def check(model: nn.Module, x: Tensor, on_tape: bool, label: str = "", oracle_model: nn.Module | None = None,
          **kwargs) -> Step:
    """The step's JVP (with its RNG state) equals the oracle to 1e-8, by the engine `on_tape` says.

    `oracle_model`: the same function without in-place writes that autograd's backward refuses."""
    step = take_step(model, x, **kwargs)
    assert step.on_tape() == on_tape, f"{label}: the tape is {'' if step.on_tape() else 'not '}taken"
    assert not on_tape or step.record.chain(x, step.logits)
    _, got = step.jvp(rng=step.rng)
    expected = oracle(oracle_model or model, step.params, step.buffers, x, step.tangents, step.rng_state)
    error = rel_error(got, expected)
    assert error < 1e-8, f"{label}: relative error {error:.2e}"
    return step


def test_only_zero_padded_convolutions_are_on_the_tape():
    for mode in ("zeros", "reflect", "circular", "replicate"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), nn.BatchNorm2d(3), nn.ReLU(),
                              nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
        check(model, torch.randn(4, 2, 5, 5), on_tape=mode == "zeros", label=mode)


class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * F.linear(x, self.weight, self.bias)


class Doubling(nn.Module):
    def forward(self, weight):
        return 2 * weight


def mlp(first: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(first or nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def test_subclassed_overridden_hooked_or_parametrized_layers_go_generic():
    torch.manual_seed(0)
    x = torch.randn(7, 5)
    check(mlp(Doubled(5, 6)), x, on_tape=False, label="Linear subclass")

    model = mlp()
    layer = model[0]
    layer.forward = lambda inp: 2 * F.linear(inp, layer.weight, layer.bias)
    check(model, x, on_tape=False, label="per-instance forward")

    model = mlp()
    model[0].register_forward_hook(lambda module, args, out: 2 * out)
    check(model, x, on_tape=False, label="forward hook")

    model = mlp()
    nn.utils.parametrize.register_parametrization(model[0], "weight", Doubling())  # Linear becomes a subclass
    check(model, x, on_tape=False, label="parametrized weight")

    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: 2 * out if type(module) is nn.Linear else None)
    try:
        check(mlp(), x, on_tape=False, label="global forward hook")
    finally:
        handle.remove()


def test_layers_without_forward_mode_formulas_fall_back_to_double_backward():
    """weight_norm's kernel and spectral_norm's out= division have no forward-mode AD formulas: the JVP is then
    taken by double backward (one warning), and is exact."""
    torch.manual_seed(0)
    x = torch.randn(7, 5)
    normed_conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(1, 2, 3, padding=1))
    for label, model, expects_fallback in [
            ("weight_norm", mlp(nn.utils.parametrizations.weight_norm(nn.Linear(5, 6))), True),
            ("weight_norm on a convolution", nn.Sequential(nn.Unflatten(1, (1, 5)), normed_conv, nn.Flatten(),
                                                           nn.Linear(10, 3)), True),
            ("spectral_norm (hook)", mlp(nn.utils.spectral_norm(nn.Linear(5, 6))), True),
            ("a plain MLP", mlp(), False)]:
        jvp._WARNED_DOUBLE_BACKWARD.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check(model, x, on_tape=not expects_fallback, label=label)
        fallbacks = [w for w in caught if "double backward" in str(w.message)]
        assert len(fallbacks) == expects_fallback, label
        assert (model in jvp._NO_FORWARD_AD) == expects_fallback, label  # later JVPs do not try forward AD again


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (no downsampling): the skip connection is an in-place add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out += identity
        out = self.relu(out)
        return out


def test_residual_block_with_in_place_add_goes_generic():
    for mode in ("train", "eval"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                              BasicBlock(4), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
        getattr(model, mode)()
        check(model, torch.randn(6, 2, 5, 5), on_tape=False, label=mode)


class InPlaceBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        F.relu(h, inplace=True)
        return self.b(h)


class InPlaceAfter(nn.Module):
    """The last layer's output (the logits) scaled in place before it is returned."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.relu = nn.ReLU()
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        out = self.b(self.relu(self.a(x)))
        out /= 2.0
        return out


def test_functional_in_place_ops_between_or_after_modules_go_generic():
    torch.manual_seed(0)
    check(InPlaceBetween(), torch.randn(9, 5), on_tape=False, label="F.relu(inplace=True) between modules")
    check(InPlaceAfter(), torch.randn(9, 5), on_tape=False, label="logits scaled in place")


class Reused(nn.Module):
    """One ReLU module called three times and one Linear applied twice (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.relu(self.first(x))
        h = self.relu(self.shared(h))
        h = self.relu(self.shared(h))
        return self.head(h)


class ShiftedAfterUse(nn.Module):
    """The pooled activations, which the ReLU-then-max-pool tangent rule reads, are shifted in place after
    the next layer consumed them (autograd keeps neither, so its backward pass is legal)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.tanh = nn.Tanh()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x):
        h = self.pool(self.relu(self.conv(x)))
        g = self.tanh(h)
        h.sub_(1.0)
        return self.fc(self.flatten(g))


def test_supported_chains_stay_on_the_tape_and_overwritten_reads_do_not():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 2), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    check(model, torch.randn(5, 2, 8, 8), on_tape=True, label="ReLU(inplace=True) modules")
    check(Reused(), torch.randn(8, 5), on_tape=True, label="reused modules")
    # The paper's students and their stacked form.
    check(fashion_student(), torch.randn(4, 1, 28, 28), on_tape=True, label="fashion student")
    check(fashion_student().to(memory_format=torch.channels_last), torch.randn(4, 1, 28, 28), on_tape=True,
          label="fashion student, channels-last (the engine's default for one run)")
    check(model.to(memory_format=torch.channels_last), torch.randn(5, 2, 8, 8), on_tape=True,
          label="a channels-last CNN with a channels-first input")
    check(stack_models([fashion_student() for _ in range(2)]), torch.randn(3, 2, 1, 28, 28), on_tape=True,
          label="stacked students")
    check(ShiftedAfterUse(), torch.randn(4, 2, 6, 6), on_tape=False, label="pooled values modified after use")
    # An in-place ReLU overwriting the Tanh output that the Tanh rule reads (autograd refuses its backward
    # pass: the step here is the forward pass alone, and the oracle differentiates an out-of-place ReLU).
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.ReLU(inplace=True), nn.Linear(6, 3))
    check(model, torch.randn(8, 5), on_tape=False, label="Tanh then ReLU(inplace=True)", backward=False,
          oracle_model=nn.Sequential(model[0], model[1], nn.ReLU(), model[3]))


def test_tied_weights_go_generic():
    """A weight the chain reads under a name missing from params (tied to another layer's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    model[2].weight = model[0].weight
    step = check(model, torch.randn(6, 4), on_tape=False, label="tied")
    assert step.record.chain(step.x, step.logits)  # a chain, but the second layer's weight is not in params


FROZEN_CASES = {
    # name: (model, input, positions of the layer whose weight/bias are frozen)
    "linear 2-D": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), (6, 4), (0, 2)),
    "linear 3-D": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), (3, 5, 4), (0, 2)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Conv1d(3, 2, 2), nn.Flatten(),
                                     nn.Linear(10, 3)), (4, 2, 8), (0, 2)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Sigmoid(), nn.Conv2d(3, 2, 2), nn.Flatten(),
                                     nn.Linear(18, 3)), (4, 2, 6, 6), (0, 2)),
    "conv2d unbatched": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 2), nn.Flatten(0),
                                               nn.Linear(18, 3)), (2, 6, 6), (0, 2)),
    "batchnorm2d": (lambda: nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                                          nn.Flatten(), nn.Linear(48, 3)), (4, 2, 6, 6), (0, 2)),
    "batchnorm1d": (lambda: nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Sigmoid(),
                                          nn.Linear(5, 3)), (6, 4), (0, 2)),
    "batchnorm1d 3-D": (lambda: nn.Sequential(nn.BatchNorm1d(2), nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Tanh(),
                                              nn.Flatten(), nn.Linear(18, 3)), (4, 2, 8), (0, 2)),
}


def test_frozen_weights_and_biases_on_the_tape():
    """Every frozen/trainable combination of weight and bias, first in the chain (no incoming tangent)
    or after a trainable layer; batch norms in train mode and in eval mode (running statistics)."""
    for name, (make, shape, positions) in FROZEN_CASES.items():
        modes = ("train", "eval") if name.startswith("batchnorm") else ("train",)
        for mode, position, frozen in itertools.product(modes, positions, itertools.product((False, True), repeat=2)):
            torch.manual_seed(0)
            model = make()
            layer = model[position]
            layer.weight.requires_grad_(not frozen[0])
            layer.bias.requires_grad_(not frozen[1])
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.running_mean.uniform_(-1, 1)
                    module.running_var.uniform_(0.5, 2)
            getattr(model, mode)()
            label = f"{name}, {mode}, layer {position}, frozen (weight, bias) {frozen}"
            check(model, torch.randn(shape), on_tape=True, label=label)


def test_pool_options_and_unbatched_inputs_on_the_tape():
    cases = {
        "ceil_mode, padding, stride": (nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            nn.Flatten(), nn.Linear(3 * 3 * 3, 3)), (4, 2, 7, 7)),
        "dilation": (nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.Tanh(), nn.MaxPool2d(2, dilation=2), nn.Flatten(1, 2), nn.Flatten(),
            nn.Linear(3 * 3 * 3, 3)), (4, 2, 9, 9)),
        "1d": (nn.Sequential(
            nn.Conv1d(2, 3, 3), nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True), nn.Flatten(), nn.Linear(3 * 4, 3)),
            (4, 2, 9)),
        "unbatched 2d": (nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(0), nn.Linear(3 * 2 * 2, 3)), (2, 6, 6)),
        "unbatched 1d": (nn.Sequential(
            nn.Conv1d(2, 3, 3), nn.Sigmoid(), nn.MaxPool1d(2), nn.Flatten(0), nn.Linear(3 * 3, 3)), (2, 8)),
    }
    for label, (model, shape) in cases.items():
        torch.manual_seed(0)
        check(model, torch.randn(shape), on_tape=True, label=label)


def test_active_dropout_is_differentiated_with_the_steps_own_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    step = take_step(model, torch.randn(8, 5))
    assert not step.on_tape()
    expected = step.oracle()
    stream = torch.get_rng_state()
    primal, got = step.jvp(rng=step.rng)
    assert torch.equal(torch.get_rng_state(), stream)  # the caller's RNG stream is left as it was
    assert torch.equal(primal, step.logits.detach())  # forward-mode AD drew the step's masks, bit for bit
    assert rel_error(got, expected) < 1e-8
    with pytest.warns(RuntimeWarning, match="dropout"):
        primal, got = step.jvp()  # without the step's RNG state: other masks, another step's derivative
    assert not torch.equal(primal, step.logits.detach())
    assert rel_error(got, expected) > 1e-2
    # Inactive dropout (eval mode, or p = 0) is the identity, on the tape.
    for mode, p in (("eval", 0.5), ("train", 0.0)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, 3))
        getattr(model, mode)()
        check(model, torch.randn(8, 5), on_tape=True, label=f"dropout {mode} p={p}")


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.encoder = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.1,
                                                  batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def test_transformer_encoder_layer_train_and_eval():
    """Attention needs the math kernel under forward-mode AD; in train mode the step runs under the same
    kernels (`jvp_kernels`), so the replay draws the step's attention- and feed-forward-dropout masks."""
    for mode in ("train", "eval"):
        torch.manual_seed(0)
        model = getattr(Encoder(), mode)()
        step = check(model, torch.randn(4, 5, 3), on_tape=False, label=mode, kernels=True)
        if mode == "train":
            primal, _ = step.jvp(rng=step.rng)
            assert torch.equal(primal, step.logits.detach())


def kernel_flags() -> tuple[bool, bool]:
    return torch.backends.mha.get_fastpath_enabled(), torch.backends.cuda.flash_sdp_enabled()


def test_jvp_kernels_across_threads():
    """The kernel switches are process-wide: a thread that leaves `jvp_kernels` first must not switch the flash
    kernels and the fast path back on under another thread still inside, and the last one out restores them."""
    before = kernel_flags()
    assert before == (True, True)  # PyTorch's defaults, so that a restore is visible
    entered, first_left, seen = threading.Barrier(2), threading.Event(), {}

    def first():
        with jvp_kernels():
            entered.wait()
        first_left.set()

    def second():
        with jvp_kernels():
            entered.wait()
            first_left.wait()
            seen["inside, after the first left"] = kernel_flags()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["inside, after the first left"] == (False, False)
    assert kernel_flags() == before
    with jvp_kernels():  # and it can be entered again
        assert kernel_flags() == (False, False)
    assert kernel_flags() == before
