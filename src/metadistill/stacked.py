"""R copies of one student, each with its own weights, as one model (grouped convolutions, batched matmuls).

`stack_models([m_0, ..., m_{R-1}])` turns R students of the same architecture (a chain of Linear,
Conv2d, BatchNorm2d, ReLU, Tanh, Sigmoid, MaxPool2d, Flatten, Identity) into one module whose input
is [B, R, *input_shape] (run r's batch in column r) and whose output is [B, R, classes]. Run r's
weights, BatchNorm statistics and activations are disjoint from every other run's:
- Conv2d(C, D, groups=g) becomes Conv2d(R*C, R*D, groups=R*g), run r owning channels r*D..(r+1)*D-1;
- BatchNorm2d(C) becomes BatchNorm2d(R*C), whose per-channel statistics are per-run statistics;
- Linear(i, o) becomes `StackedLinear(R, i, o)`, one batched matrix product;
- the layout changes are the reshapes `MergeRuns` ([B, R, C, H, W] -> [B, R*C, H, W]) and
  `SplitRuns` ([B, R*C, h, w] -> [B, R, C*h*w], in place of Flatten).
So a loss that is the sum over runs of each run's own loss has, in run r's weights, exactly run r's
gradient, and an element-wise optimizer (SGD, Adam) on the stacked weights is R independent ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def stacked_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """[B, R, in] x [R, out, in] (+ [R, out]) -> [B, R, out]."""
    xt = x.transpose(0, 1)
    wt = weight.transpose(1, 2)
    out = torch.bmm(xt, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), xt, wt)
    return out.transpose(0, 1)


class StackedLinear(nn.Module):
    """R independent Linear layers applied to [B, R, in] -> [B, R, out]."""

    def __init__(self, runs: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.runs, self.in_features, self.out_features = runs, in_features, out_features
        self.weight = nn.Parameter(torch.empty(runs, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(runs, out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return stacked_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"runs={self.runs}, in_features={self.in_features}, out_features={self.out_features}"


class MergeRuns(nn.Module):
    """[B, R, C, H, W] -> [B, R*C, H, W]: the runs side by side as channel groups, in channels-last
    memory order (max-pooling and grouped convolutions run several times faster in it on CPUs)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1, 2).contiguous(memory_format=torch.channels_last)


class SplitRuns(nn.Module):
    """[B, R*C, ...] (or [B, R, ...]) -> [B, R, features]: Flatten, run by run."""

    def __init__(self, runs: int) -> None:
        super().__init__()
        self.runs = runs

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.runs, -1)


_SHARED = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity)


def _cat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach() for t in tensors])


def stack_models(models: list[nn.Module]) -> nn.Sequential:
    """One model computing all of `models` side by side (see the module docstring).

    Raises NotImplementedError for an architecture outside the supported chain; callers fall back to
    training the runs one at a time.
    """
    if not models:
        raise ValueError("stack_models needs at least one model")
    runs = len(models)
    chains = [list(m.children()) if isinstance(m, nn.Sequential) else [m] for m in models]
    if any(len(c) != len(chains[0]) for c in chains):
        raise NotImplementedError("the runs' models differ in structure")
    layers: list[nn.Module] = []
    merged = False  # whether activations are [B, R*C, ...] (after a conv) rather than [B, R, ...]
    for group in zip(*chains):
        first = group[0]
        if any(type(m) is not type(first) for m in group):
            raise NotImplementedError("the runs' models differ in structure")
        if isinstance(first, nn.Linear):
            if merged:
                raise NotImplementedError("a Linear layer on convolutional activations needs a Flatten first")
            layer = StackedLinear(runs, first.in_features, first.out_features, first.bias is not None)
            layer.weight.data.copy_(torch.stack([m.weight.detach() for m in group]))
            if layer.bias is not None:
                layer.bias.data.copy_(torch.stack([m.bias.detach() for m in group]))
            layers.append(layer)
        elif isinstance(first, nn.Conv2d):
            if first.padding_mode != "zeros":
                raise NotImplementedError("only zero-padded convolutions can be stacked")
            if not merged:
                layers.append(MergeRuns())
                merged = True
            layer = nn.Conv2d(runs * first.in_channels, runs * first.out_channels, first.kernel_size, first.stride,
                              first.padding, first.dilation, runs * first.groups, first.bias is not None)
            layer.weight.data.copy_(_cat([m.weight for m in group]))
            if layer.bias is not None:
                layer.bias.data.copy_(_cat([m.bias for m in group]))
            layers.append(layer)
        elif isinstance(first, nn.BatchNorm2d):
            if not merged:
                raise NotImplementedError("BatchNorm2d before any convolution cannot be stacked")
            layer = nn.BatchNorm2d(runs * first.num_features, first.eps, first.momentum, first.affine,
                                   first.track_running_stats)
            for name, tensor in layer.named_parameters():
                tensor.data.copy_(_cat([getattr(m, name) for m in group]))
            if first.track_running_stats:
                layer.running_mean.copy_(_cat([m.running_mean for m in group]))
                layer.running_var.copy_(_cat([m.running_var for m in group]))
                layer.num_batches_tracked.copy_(first.num_batches_tracked)
            layers.append(layer)
        elif isinstance(first, nn.MaxPool2d):
            if not merged:
                raise NotImplementedError("MaxPool2d before any convolution cannot be stacked")
            layers.append(nn.MaxPool2d(first.kernel_size, first.stride, first.padding, first.dilation,
                                       first.return_indices, first.ceil_mode))
        elif isinstance(first, nn.Flatten):
            if first.start_dim != 1 or first.end_dim != -1:
                raise NotImplementedError("only Flatten(1, -1) can be stacked")
            layers.append(SplitRuns(runs))
            merged = False
        elif isinstance(first, _SHARED):
            layers.append(type(first)())
        else:
            raise NotImplementedError(f"{type(first).__name__} layers cannot be stacked")
    if merged:
        raise NotImplementedError("the model must end with Linear layers on flattened features")
    stacked = nn.Sequential(*layers)
    stacked.train(models[0].training)
    return stacked.to(next(models[0].parameters()).device, memory_format=torch.channels_last)
