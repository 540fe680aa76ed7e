"""Jacobian-vector products of a student's logits along a weight direction (forward-mode AD).

Two engines compute the same exact J_z u:
- `generic`: torch.autograd.forward_ad through `functional_call`; works for any model, and
  recomputes the forward pass alongside the tangents.
- `tape`: tangent propagation through the activations recorded during the training step's own
  forward pass (`record_activations`), so no primal work is repeated. It applies to models whose
  forward is a chain of supported layers (Linear, Conv1d/2d, BatchNorm1d/2d, ReLU, Tanh, Sigmoid,
  MaxPool1d/2d, Flatten, Identity, Dropout when inactive, and the layers of `stacked`); anything
  else falls back to `generic`.
Both are checked against each other and against double-backward oracles in the tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .stacked import MergeRuns, SplitRuns, StackedLinear, stacked_linear

_CHAIN_LAYERS = (
    nn.Linear,
    StackedLinear,
    MergeRuns,
    SplitRuns,
    nn.Conv1d,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
)

_READS_INPUT = (nn.Linear, StackedLinear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool1d,
                nn.MaxPool2d)


@dataclass
class _Call:
    module: nn.Module
    prefix: str
    inp: Tensor
    out: Tensor
    saved: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.version = self.inp._version

    def intact(self) -> bool:
        """The input, where the tangent rule reads it, was not modified in place after the call."""
        reads_input = isinstance(self.module, _READS_INPUT)
        return not reads_input or self.inp._version == self.version


@dataclass
class ActivationRecord:
    """The leaf-module calls of one forward pass, in order; `chain` says whether the tape engine applies."""

    calls: list[_Call] = field(default_factory=list)
    supported: bool = True

    def chain(self, x: Tensor, logits: Tensor) -> bool:
        if not self.supported or not self.calls:
            return False
        if self.calls[0].inp is not x or self.calls[-1].out is not logits:
            return False
        linked = all(a.out is b.inp for a, b in zip(self.calls, self.calls[1:]))
        return linked and all(call.intact() for call in self.calls)


def _leaf_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if not any(True for _ in module.children()):
            yield name, module


@contextmanager
def record_activations(model: nn.Module) -> Iterator[ActivationRecord]:
    """Record the inputs and outputs of every leaf module called inside the block.

    The tensors recorded are the ones autograd keeps for the backward pass anyway; the max-pool
    indices and batch-norm statistics are read from the autograd nodes when they exist.
    """
    record = ActivationRecord()

    def hook(prefix: str):
        def fn(module: nn.Module, args: tuple, out: object) -> None:
            if not isinstance(module, _CHAIN_LAYERS) or len(args) != 1 or not isinstance(out, Tensor):
                record.supported = False
                return
            if isinstance(module, nn.Dropout) and module.training and module.p > 0:
                record.supported = False
                return
            call = _Call(module, prefix, args[0], out)
            node = out.grad_fn
            if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)) and node is not None:
                indices = getattr(node, "_saved_result1", None)
                if indices is not None and indices.dtype == torch.int64:
                    call.saved["indices"] = indices
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and node is not None:
                if type(node).__name__ == "NativeBatchNormBackward0" and node._saved_training:
                    call.saved["mean"] = node._saved_result1
                    call.saved["invstd"] = node._saved_result2
            record.calls.append(call)

        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in _leaf_modules(model)]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def capture_rng(device: torch.device) -> object:
    """TEMPORARY (replaced by the jvp-exact branch): the RNG state before a forward pass."""
    return torch.get_rng_state()


@contextmanager
def replay_rng(state: object) -> Iterator[None]:
    """TEMPORARY: run the block with the captured RNG state, leaving the caller's stream as it was."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        yield


@contextmanager
def jvp_kernels() -> Iterator[None]:
    """TEMPORARY: kernels that forward-mode AD can differentiate."""
    yield


def generic_jvp(
    model: nn.Module,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    x: Tensor,
    tangents: dict[str, Tensor],
    rng: object = None,
) -> tuple[Tensor, Tensor]:
    """(logits, J_logits · tangents) at `params` by forward-mode AD; `buffers` are cloned, never written."""
    scratch = {name: b.clone() for name, b in buffers.items()}
    with fwad.dual_level(), replay_rng(rng):
        duals = {name: fwad.make_dual(p.detach(), tangents[name]) if name in tangents else p.detach()
                 for name, p in params.items()}
        out = functional_call(model, (duals, scratch), (x,))
        primal, tangent = fwad.unpack_dual(out)
    if tangent is None:
        tangent = torch.zeros_like(primal)
    return primal, tangent


def _param(call: _Call, params: dict[str, Tensor], name: str) -> Tensor | None:
    return params.get(f"{call.prefix}.{name}" if call.prefix else name)


def _channel_mean(t: Tensor) -> Tensor:
    dims = [0] + list(range(2, t.dim()))
    return t.mean(dim=dims, keepdim=True)


def _channel_view(v: Tensor, like: Tensor) -> Tensor:
    return v.view([1, -1] + [1] * (like.dim() - 2))


def _linear_tangent(call: _Call, params: dict[str, Tensor], tangents: dict[str, Tensor],
                    t_in: Tensor | None) -> Tensor | None:
    module = call.module
    weight = _param(call, params, "weight")
    d_weight = _param(call, tangents, "weight")
    d_bias = _param(call, tangents, "bias") if module.bias is not None else None

    def apply(inp: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if isinstance(module, nn.Linear):
            return F.linear(inp, w, b)
        if isinstance(module, StackedLinear):
            return stacked_linear(inp, w, b)
        conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
        return conv(inp, w, b, module.stride, module.padding, module.dilation, module.groups)

    out = None
    if t_in is not None:
        out = apply(t_in, weight, None)
    if d_weight is not None:
        term = apply(call.inp, d_weight, d_bias)
        out = term if out is None else out + term
    elif d_bias is not None:
        if isinstance(module, StackedLinear):
            term = d_bias.unsqueeze(0)
        else:
            term = _channel_view(d_bias, call.out) if call.out.dim() > 2 else d_bias
        out = term.expand_as(call.out) if out is None else out + term
    return out


def _batchnorm_tangent(call: _Call, params: dict[str, Tensor], tangents: dict[str, Tensor],
                       buffers: dict[str, Tensor], t_in: Tensor | None) -> Tensor | None:
    """Tangent of y = gamma * (x - mean) * invstd + beta, written as a * t + b * x + c per channel.

    With batch statistics, d x_hat = invstd * (t - mean(t) - x_hat * mean(t * x_hat)). Collecting the
    per-channel coefficients first keeps the work on full-size tensors to two fused passes.
    """
    module = call.module
    x = call.inp
    batch_stats = module.training or module.running_mean is None
    if batch_stats:
        if "mean" in call.saved:
            mean, invstd = call.saved["mean"], call.saved["invstd"]
        else:
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dim=dims)
            invstd = torch.rsqrt(x.var(dim=dims, unbiased=False) + module.eps)
    else:
        mean = _param(call, buffers, "running_mean")
        invstd = torch.rsqrt(_param(call, buffers, "running_var") + module.eps)
    mean, invstd = _channel_view(mean, x), _channel_view(invstd, x)
    weight = _param(call, params, "weight")
    d_weight = _param(call, tangents, "weight")
    d_bias = _param(call, tangents, "bias")
    gain = invstd if weight is None else invstd * _channel_view(weight, x)
    # y_dot = a * t + b * x_hat + c, then x_hat = invstd * x - invstd * mean.
    a = gain if t_in is not None else None
    b = torch.zeros_like(gain) if d_weight is None else _channel_view(d_weight, x).clone()
    c = torch.zeros_like(gain) if d_bias is None else _channel_view(d_bias, x).clone()
    if t_in is not None and batch_stats:
        t_mean = _channel_mean(t_in)
        tx_hat_mean = invstd * (_channel_mean(t_in * x) - mean * t_mean)
        b = b - gain * tx_hat_mean
        c = c - gain * t_mean
    if a is None and d_weight is None and d_bias is None:
        return None
    c = c - b * invstd * mean
    b = b * invstd
    out = torch.addcmul(c, b, x)
    return out if a is None else out.addcmul_(a, t_in)


def _pool_tangent(call: _Call, t_in: Tensor) -> Tensor:
    module = call.module
    indices = call.saved.get("indices")
    if indices is None:
        pool = F.max_pool1d if isinstance(module, nn.MaxPool1d) else F.max_pool2d
        _, indices = pool(call.inp, module.kernel_size, module.stride, module.padding,
                          module.dilation, ceil_mode=module.ceil_mode, return_indices=True)
    if t_in.dim() == 4 and t_in.is_contiguous(memory_format=torch.channels_last) and not t_in.is_contiguous():
        # Gather in channels-last order, so the result keeps the activations' memory format (mixing
        # formats in the element-wise ops that follow costs several times their own time).
        flat = t_in.permute(0, 2, 3, 1).flatten(1, 2)
        picked = flat.gather(1, indices.permute(0, 2, 3, 1).flatten(1, 2))
        batch, channels, height, width = call.out.shape
        return picked.view(batch, height, width, channels).permute(0, 3, 1, 2)
    flat = t_in.flatten(start_dim=2).gather(2, indices.flatten(start_dim=2))
    return flat.view_as(call.out)


def tape_jvp(
    record: ActivationRecord,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    tangents: dict[str, Tensor],
) -> Tensor:
    """J_logits · tangents by propagating tangents through a recorded chain (see `ActivationRecord.chain`).

    `params` and `buffers` must be the values the recorded forward pass used.
    """
    t: Tensor | None = None
    calls = record.calls
    for i, call in enumerate(calls):
        module = call.module
        following = calls[i + 1].module if i + 1 < len(calls) else None
        if isinstance(module, (nn.Linear, StackedLinear, nn.Conv1d, nn.Conv2d)):
            t = _linear_tangent(call, params, tangents, t)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            t = _batchnorm_tangent(call, params, tangents, buffers, t)
        elif t is None:
            continue
        elif isinstance(module, nn.ReLU):
            if isinstance(following, (nn.MaxPool1d, nn.MaxPool2d)):
                continue  # masked after the pool, on the smaller tensor: see _pool_tangent
            t = torch.ops.aten.threshold_backward(t, call.out, 0)
        elif isinstance(module, nn.Tanh):
            t = t * (1 - call.out * call.out)
        elif isinstance(module, nn.Sigmoid):
            t = t * call.out * (1 - call.out)
        elif isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)):
            t = _pool_tangent(call, t)
            if i > 0 and isinstance(calls[i - 1].module, nn.ReLU):
                # relu then max-pool: the selected element passed the relu iff the pooled value is > 0.
                t = torch.ops.aten.threshold_backward(t, call.out, 0)
        elif isinstance(module, nn.Flatten):
            t = t.flatten(module.start_dim, module.end_dim)
        elif isinstance(module, (MergeRuns, SplitRuns)):
            t = module(t)
        # Identity and inactive Dropout pass the tangent through unchanged.
    return torch.zeros_like(record.calls[-1].out) if t is None else t


def logits_jvp(
    model: nn.Module,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    x: Tensor,
    tangents: dict[str, Tensor],
    record: ActivationRecord | None = None,
    logits: Tensor | None = None,
    rng: object = None,
) -> tuple[Tensor, Tensor]:
    """(logits, J_logits · tangents) at `params`; uses the tape when `record` covers a supported chain."""
    if record is not None and logits is not None and record.chain(x, logits):
        return logits.detach(), tape_jvp(record, params, buffers, tangents)
    return generic_jvp(model, params, buffers, x, tangents, rng)
