"""Jacobian-vector products of a student's logits along a weight direction (forward-mode AD).

Two engines compute the same exact J_z u:
- `generic`: torch.autograd.forward_ad through `functional_call`; works for any model, and
  recomputes the forward pass alongside the tangents. It runs under `jvp_kernels()` (the math
  kernel of scaled_dot_product_attention, which has forward-mode formulas) and, given the RNG state
  captured before the step's forward (`capture_rng`), replays it (`replay_rng`), so that dropout
  draws the step's own masks.
- `tape`: tangent propagation through the activations recorded during the training step's own
  forward pass (`record_activations`), so no primal work is repeated. It applies only where the
  record proves that the forward pass was a chain of supported layers (see `ActivationRecord.chain`
  and `uses_tape`): each layer's type is exactly one of Linear, Conv1d/2d (zero padding),
  BatchNorm1d/2d, ReLU, Tanh, Sigmoid, MaxPool1d/2d, Flatten, Identity, Dropout when inactive, and
  the layers of `stacked` (no subclasses, no hooks of others, no per-instance forward), each layer
  consumed exactly the tensor the previous one returned, unmodified (tensor versions), and every
  tensor a tangent rule reads is unchanged since. Anything else falls back to `generic`.
Both are checked against each other and against double-backward oracles in the tests.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules import module as _module_globals
from torch.nn.modules.dropout import _DropoutNd

from .stacked import MergeRuns, SplitRuns, StackedLinear, stacked_linear

_LINEAR_LIKE = frozenset({nn.Linear, StackedLinear, nn.Conv1d, nn.Conv2d})
_CONV_SPATIAL = {nn.Conv1d: 1, nn.Conv2d: 2}
_BATCHNORM = frozenset({nn.BatchNorm1d, nn.BatchNorm2d})
_POOL_SPATIAL = {nn.MaxPool1d: 1, nn.MaxPool2d: 2}

# The tape takes a layer only when its type is exactly one of these (a subclass may compute anything).
_CHAIN_LAYERS = frozenset({
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
})

# What each tangent rule reads after the forward pass (besides shapes): the layer's input, its output.
_READS_INPUT = frozenset({nn.Linear, StackedLinear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d,
                          nn.MaxPool1d, nn.MaxPool2d})
_READS_OUTPUT = frozenset({nn.ReLU, nn.Tanh, nn.Sigmoid, nn.MaxPool1d, nn.MaxPool2d})


def _rule_applies(module: nn.Module) -> bool:
    """Whether the tangent rule of `module`'s exact type implements the options it is configured with.

    Options not checked here are read by the rules (Linear: none; conv stride, padding including
    "same"/"valid", dilation, groups; BatchNorm eps, affine, track_running_stats, and training at the
    call; max-pool kernel, stride, padding, dilation, ceil_mode, through the pool's own indices;
    Flatten start_dim, end_dim) or do not change the output (BatchNorm momentum, ReLU inplace, whose
    in-place write the version checks follow).
    """
    kind = type(module)
    if kind not in _CHAIN_LAYERS or "forward" in module.__dict__:
        return False
    if kind in _CONV_SPATIAL:
        return module.padding_mode == "zeros"
    if kind in _POOL_SPATIAL:
        return not module.return_indices
    if kind is nn.Dropout:
        return not (module.training and module.p > 0)
    return True


def _global_hooks() -> bool:
    """Whether module hooks registered for all modules could change what a layer receives or returns."""
    return bool(getattr(_module_globals, "_global_forward_hooks", None)
                or getattr(_module_globals, "_global_forward_pre_hooks", None))


@dataclass(eq=False)
class _Call:
    module: nn.Module
    prefix: str
    inp: Tensor
    out: Tensor
    in_version: int  # the input's version as the layer received it
    out_version: int  # the output's version as the layer returned it
    batch_stats: bool = False  # BatchNorm: normalized by the batch's statistics (not the running ones)
    saved: dict[str, Tensor] = field(default_factory=dict)

    def intact(self) -> bool:
        """What the tangent rule reads (input, output) was not modified in place since the call."""
        kind = type(self.module)
        if kind in _READS_INPUT and self.inp._version != self.in_version:
            return False
        return kind not in _READS_OUTPUT or self.out._version == self.out_version


@dataclass
class ActivationRecord:
    """The leaf-module calls of one forward pass, in order; `chain` says whether the tape engine applies.

    `random` is set when an active dropout layer was called: the forward pass drew random numbers, and
    a re-run of it (the generic engine) needs the step's RNG state (`capture_rng`) to be the same pass.
    """

    calls: list[_Call] = field(default_factory=list)
    supported: bool = True
    random: bool = False

    def chain(self, x: Tensor, logits: Tensor) -> bool:
        """Whether the recorded calls prove that `logits` = layer_n(...layer_1(x)) with what was recorded.

        Integer and identity comparisons only: the first layer received `x`, the last returned
        `logits` (not modified since); each layer received the object the previous layer returned,
        at the version it was returned with; and what each tangent rule reads is unchanged.
        """
        calls = self.calls
        if not self.supported or not calls:
            return False
        last = calls[-1]
        if calls[0].inp is not x or last.out is not logits or logits._version != last.out_version:
            return False
        for a, b in zip(calls, calls[1:]):
            if b.inp is not a.out or b.in_version != a.out_version:
                return False
        return all(call.intact() for call in calls)


def _leaf_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if not any(True for _ in module.children()):
            yield name, module


def _version(t: object) -> int | None:
    if not isinstance(t, Tensor):
        return None
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


@contextmanager
def record_activations(model: nn.Module) -> Iterator[ActivationRecord]:
    """Record the inputs and outputs of every leaf module called inside the block.

    Each call is recorded separately (a module called twice is two calls), with the version of its
    input when the layer received it (a forward pre-hook) and of its output when it returned it.
    The tensors recorded are the ones autograd keeps for the backward pass anyway; the max-pool
    indices and batch-norm statistics are read from the autograd nodes when they exist.
    """
    record = ActivationRecord()
    pending: list[tuple[nn.Module, int | None]] = []

    def pre(module: nn.Module, args: tuple) -> None:
        pending.append((module, _version(args[0]) if len(args) == 1 else None))

    def hook(prefix: str):
        def fn(module: nn.Module, args: tuple, out: object) -> None:
            entered, in_version = pending.pop() if pending else (None, None)
            if isinstance(module, _DropoutNd) and module.training and module.p > 0:
                record.random = True
            if not record.supported:
                return
            out_version = _version(out)
            if (entered is not module or in_version is None or out_version is None or len(args) != 1
                    or not _rule_applies(module) or len(module._forward_hooks) != 1
                    or len(module._forward_pre_hooks) != 1 or _global_hooks()):
                record.supported = False
                return
            call = _Call(module, prefix, args[0], out, in_version, out_version)
            kind = type(module)
            node = out.grad_fn
            if kind is nn.MaxPool2d and node is not None and type(node).__name__ == "MaxPool2DWithIndicesBackward0":
                indices = getattr(node, "_saved_result1", None)
                if indices is not None and indices.dtype == torch.int64:
                    call.saved["indices"] = indices
            if kind in _BATCHNORM:
                call.batch_stats = module.training or (module.running_mean is None and module.running_var is None)
                if node is not None and type(node).__name__ == "NativeBatchNormBackward0" and node._saved_training:
                    call.saved["mean"] = node._saved_result1
                    call.saved["invstd"] = node._saved_result2
            record.calls.append(call)

        return fn

    handles = []
    try:
        for name, m in _leaf_modules(model):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(hook(name)))
        yield record
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class RngState:
    """The global RNG state before a forward pass: the CPU generator's, and a cuda device's (index, state)."""

    cpu: Tensor
    cuda: tuple[int, Tensor] | None = None


def capture_rng(device: torch.device | str | None = None) -> RngState:
    """The RNG state a forward pass on `device` starts from; call it just before the step's forward."""
    device = torch.device("cpu" if device is None else device)
    cuda = None
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        cuda = (index, torch.cuda.get_rng_state(index))
    return RngState(torch.get_rng_state(), cuda)


@contextmanager
def replay_rng(state: RngState | None) -> Iterator[None]:
    """Run the block from the captured RNG state; the caller's RNG stream is left as it was before the block.
    With no state (None), the block just runs."""
    if state is None:
        yield
        return
    devices = [] if state.cuda is None else [state.cuda[0]]
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state.cpu)
        if state.cuda is not None:
            torch.cuda.set_rng_state(state.cuda[1], state.cuda[0])
        yield


@contextmanager
def jvp_kernels() -> Iterator[None]:
    """The kernels `generic_jvp` runs the forward pass with: scaled_dot_product_attention's math kernel
    (the flash kernels have no forward-mode formulas) and no fused MultiheadAttention fast path.

    Wrap the step's own forward in it when the step is kept for a hypergradient, so that its
    attention-dropout masks are drawn by the same kernel as in the replay.

    Both switches are process-wide flags of PyTorch, so the block is counted across threads (and nested
    blocks): the first block to enter sets them, the last one to leave restores what it found. A thread
    that leaves early cannot switch the flash kernels back on under another thread still inside.
    """
    global _kernel_users
    with _kernel_lock:
        if _kernel_users == 0:
            fastpath = torch.backends.mha.get_fastpath_enabled()
            _kernel_flags.callback(torch.backends.mha.set_fastpath_enabled, fastpath)
            torch.backends.mha.set_fastpath_enabled(False)
            _kernel_flags.enter_context(sdpa_kernel(SDPBackend.MATH))
        _kernel_users += 1
    try:
        yield
    finally:
        with _kernel_lock:
            _kernel_users -= 1
            if _kernel_users == 0:
                _kernel_flags.close()


_kernel_lock = threading.Lock()
_kernel_users = 0  # blocks of jvp_kernels now open, in all threads
_kernel_flags = ExitStack()  # restores the flags the first open block found


def generic_jvp(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor,
                tangents: dict[str, Tensor], *, rng: RngState | None = None) -> tuple[Tensor, Tensor]:
    """(logits, J_logits · tangents) at `params` by forward-mode AD; `buffers` are cloned, never written.

    With `rng` (from `capture_rng` before the step's forward), the pass replays the step's random
    draws (dropout masks); the caller's RNG stream is not advanced. A model with an operation that has no
    forward-mode formula gets `_double_backward_jvp` instead, from its first failure on (one warning per cause).
    """
    if model not in _NO_FORWARD_AD:
        try:
            with jvp_kernels(), replay_rng(rng), fwad.dual_level():
                duals = {name: fwad.make_dual(p.detach(), tangents[name]) if name in tangents else p.detach()
                         for name, p in params.items()}
                out = functional_call(model, (duals, {name: b.clone() for name, b in buffers.items()}), (x,))
                primal, tangent = fwad.unpack_dual(out)
            return primal, torch.zeros_like(primal) if tangent is None else tangent
        except NotImplementedError as error:  # an operation without a forward-mode formula (weight_norm, say)
            if "forward" not in str(error):
                raise
            _NO_FORWARD_AD.add(model)  # its later JVPs go straight to double backward, without a failed try
            reason = str(error).splitlines()[0]
            if reason not in _WARNED_DOUBLE_BACKWARD:
                _WARNED_DOUBLE_BACKWARD.add(reason)
                warnings.warn(f"forward-mode AD failed on this student ({reason}); its hypergradients are taken by "
                              "double backward instead: exact, and slower", RuntimeWarning, stacklevel=3)
    return _double_backward_jvp(model, params, buffers, x, tangents, rng)


_NO_FORWARD_AD: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models forward-mode AD failed on
_WARNED_DOUBLE_BACKWARD: set[str] = set()  # the causes already warned about


def _double_backward_jvp(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor,
                         tangents: dict[str, Tensor], rng: RngState | None) -> tuple[Tensor, Tensor]:
    """`generic_jvp` for a model that forward-mode AD cannot differentiate: J u = d/dv <J^T v, u> by double
    backward (reverse over reverse), exact too, at 2.3x the cost on the Fashion-MNIST student."""
    leaves = {name: p.detach().requires_grad_(name in tangents) for name, p in params.items()}
    with jvp_kernels(), replay_rng(rng), torch.enable_grad():
        out = functional_call(model, (leaves, {name: b.clone() for name, b in buffers.items()}), (x,))
        names = [name for name in tangents if name in leaves]
        v = torch.zeros_like(out, requires_grad=True)
        grads = torch.autograd.grad(out, [leaves[name] for name in names], grad_outputs=v, create_graph=True,
                                    allow_unused=True)
        pairs = [(g, tangents[name]) for g, name in zip(grads, names) if g is not None and g.requires_grad]
        if not pairs:  # the logits do not depend on the tangent's weights
            return out.detach(), torch.zeros_like(out.detach())
        tangent = torch.autograd.grad([g for g, _ in pairs], v, grad_outputs=[u for _, u in pairs])[0]
    return out.detach(), tangent


def _name(call: _Call, name: str) -> str:
    return f"{call.prefix}.{name}" if call.prefix else name


def _param(call: _Call, params: dict[str, Tensor], name: str) -> Tensor | None:
    return params.get(_name(call, name))


def _channel_mean(t: Tensor) -> Tensor:
    dims = [0] + list(range(2, t.dim()))
    return t.mean(dim=dims, keepdim=True)


def _channel_view(v: Tensor, like: Tensor) -> Tensor:
    return v.view([1, -1] + [1] * (like.dim() - 2))


def _linear_tangent(call: _Call, params: dict[str, Tensor], tangents: dict[str, Tensor],
                    t_in: Tensor | None) -> Tensor | None:
    module = call.module
    kind = type(module)
    weight = _param(call, params, "weight")
    d_weight = _param(call, tangents, "weight")
    d_bias = _param(call, tangents, "bias") if module.bias is not None else None

    def apply(inp: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if kind is nn.Linear:
            return F.linear(inp, w, b)
        if kind is StackedLinear:
            return stacked_linear(inp, w, b)
        conv = F.conv1d if kind is nn.Conv1d else F.conv2d
        return conv(inp, w, b, module.stride, module.padding, module.dilation, module.groups)

    out = None
    if t_in is not None:
        out = apply(t_in, weight, None)
    if d_weight is not None:
        term = apply(call.inp, d_weight, d_bias)
        out = term if out is None else out + term
    elif d_bias is not None:
        if kind is StackedLinear:
            term = d_bias.unsqueeze(0)  # [R, out] over [B, R, out]
        elif kind is nn.Linear:
            term = d_bias  # the bias runs along the last dimension, whatever the leading ones
        else:  # convolutions: channels just before the spatial dimensions (batched or not)
            term = d_bias.view([-1] + [1] * _CONV_SPATIAL[kind])
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
    batch_stats = call.batch_stats
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
    spatial = _POOL_SPATIAL[type(module)]
    indices = call.saved.get("indices")
    if indices is None:
        pool = F.max_pool1d if spatial == 1 else F.max_pool2d
        _, indices = pool(call.inp, module.kernel_size, module.stride, module.padding,
                          module.dilation, ceil_mode=module.ceil_mode, return_indices=True)
    if t_in.dim() == 4 and t_in.is_contiguous(memory_format=torch.channels_last) and not t_in.is_contiguous():
        # Gather in channels-last order, so the result keeps the activations' memory format (mixing
        # formats in the element-wise ops that follow costs several times their own time).
        flat = t_in.permute(0, 2, 3, 1).flatten(1, 2)
        picked = flat.gather(1, indices.permute(0, 2, 3, 1).flatten(1, 2))
        batch, channels, height, width = call.out.shape
        return picked.view(batch, height, width, channels).permute(0, 3, 1, 2)
    # The indices count positions within each channel's (flattened) spatial plane, batched or not.
    flat = t_in.flatten(start_dim=-spatial).gather(-1, indices.flatten(start_dim=-spatial))
    return flat.view_as(call.out)


def tape_jvp(
    record: ActivationRecord,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    tangents: dict[str, Tensor],
) -> Tensor:
    """J_logits · tangents by propagating tangents through a recorded chain.

    Only valid where `uses_tape` (or at least `ActivationRecord.chain`) holds. `params` and `buffers`
    must be the values the recorded forward pass used.
    """
    t: Tensor | None = None
    calls = record.calls
    for i, call in enumerate(calls):
        module = call.module
        kind = type(module)
        following = type(calls[i + 1].module) if i + 1 < len(calls) else None
        if kind in _LINEAR_LIKE:
            t = _linear_tangent(call, params, tangents, t)
        elif kind in _BATCHNORM:
            t = _batchnorm_tangent(call, params, tangents, buffers, t)
        elif t is None:
            continue
        elif kind is nn.ReLU:
            if following in _POOL_SPATIAL:
                continue  # masked after the pool, on the smaller tensor: see _pool_tangent
            t = torch.ops.aten.threshold_backward(t, call.out, 0)
        elif kind is nn.Tanh:
            t = t * (1 - call.out * call.out)
        elif kind is nn.Sigmoid:
            t = t * call.out * (1 - call.out)
        elif kind in _POOL_SPATIAL:
            t = _pool_tangent(call, t)
            if i > 0 and type(calls[i - 1].module) is nn.ReLU:
                # relu then max-pool: the selected element passed the relu iff the pooled value is > 0.
                t = torch.ops.aten.threshold_backward(t, call.out, 0)
        elif kind is nn.Flatten:
            t = t.flatten(module.start_dim, module.end_dim)
        elif kind is MergeRuns or kind is SplitRuns:
            t = module.forward(t)
        # Identity and inactive Dropout pass the tangent through unchanged.
    return torch.zeros_like(record.calls[-1].out) if t is None else t


def _tape_reads_all(record: ActivationRecord, params: dict[str, Tensor], buffers: dict[str, Tensor],
                    tangents: dict[str, Tensor]) -> bool:
    """Every weight a rule reads is in `params` (running statistics in `buffers`), and every tangent is
    read by a rule (a parameter the chain does not read, tied or used elsewhere, needs the generic engine)."""
    read: set[str] = set()
    for call in record.calls:
        module = call.module
        kind = type(module)
        if kind in _LINEAR_LIKE:
            names = ("weight",) if module.bias is None else ("weight", "bias")
        elif kind in _BATCHNORM:
            if not call.batch_stats and (_name(call, "running_mean") not in buffers
                                         or _name(call, "running_var") not in buffers):
                return False
            names = ("weight", "bias") if module.affine else ()
        else:
            continue
        for name in names:
            full = _name(call, name)
            if full not in params:
                return False
            read.add(full)
    return read.issuperset(tangents)


def uses_tape(
    record: ActivationRecord | None,
    x: Tensor,
    logits: Tensor | None,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    tangents: dict[str, Tensor],
) -> bool:
    """Whether `logits_jvp` with these arguments takes the tape engine (otherwise the generic one)."""
    return (record is not None and logits is not None and record.chain(x, logits)
            and _tape_reads_all(record, params, buffers, tangents))


def logits_jvp(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor,
               tangents: dict[str, Tensor], record: ActivationRecord | None = None, logits: Tensor | None = None,
               *, rng: RngState | None = None) -> tuple[Tensor, Tensor]:
    """(logits, J_logits · tangents) at `params`; uses the tape when `record` proves a supported chain.

    `rng`: the RNG state captured (`capture_rng`) just before the recorded forward pass; the generic
    engine replays it, so that a forward pass with dropout is differentiated with its own masks.
    """
    if uses_tape(record, x, logits, params, buffers, tangents):
        return logits.detach(), tape_jvp(record, params, buffers, tangents)
    if rng is None and record is not None and record.random:
        warnings.warn("the recorded forward pass used active dropout but no RNG state was given (rng=): the "
                      "Jacobian-vector product is taken with fresh dropout masks, not the step's own",
                      RuntimeWarning, stacklevel=2)
    return generic_jvp(model, params, buffers, x, tangents, rng=rng)
