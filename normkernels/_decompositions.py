"""The op layer: each forward op of ours written in elementary ATen ops, registered as its
decomposition in torch's table (``torch._decomp``).

Nothing that computes for a user runs these: eager calls, ``torch.compile`` (inductor keeps
our ops: it decomposes by its own list) and ``torch.export`` (its default
``run_decompositions()`` keeps them too) all run our kernels. They are for tools that lower a
graph to another runtime and decompose the ops they cannot translate by this table: the
default ``torch.onnx.export`` (``dynamo=True``) does exactly that, so a converted model
exports to standard ONNX operators (ReduceMean, Sub, Mul, Sqrt, ...) with no option and no
import of ours, as a torch.nn one does.

The math is the kernels': statistics in fp32 for fp16/bf16 inputs (fp64 for fp64), variance
two-pass (the mean of squared deviations, never E[x²] - E[x]²), one rounding to the input's
dtype at the end. Each returns what its op returns (shapes and dtypes of the fake kernels in
_ops.py), so graphs that read the statistics (batch norm's running-statistics update in
training) export too. Backward ops have none: exported graphs are inference graphs.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor
from torch._decomp import register_decomposition

from ._ops import ops, stats_dtype


def _widen(x: Tensor) -> Tensor:
    return x.to(stats_dtype(x))


def _channel_view(p: Tensor, like: Tensor) -> Tensor:
    """[C] shaped to broadcast over dim 1 of `like` ([N, C, *]), in like's dtype."""
    return p.to(like.dtype).reshape([1, -1] + [1] * (like.dim() - 2))


def _channel_affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    if weight is not None:
        y = y * _channel_view(weight, y)
    if bias is not None:
        y = y + _channel_view(bias, y)
    return y


def _moments(x: Tensor, dims: List[int]):
    """(mean, x - mean, biased variance) over dims, kept as size-1 dims: two-pass."""
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    return mean, centered, (centered * centered).mean(dims, keepdim=True)


@register_decomposition(ops.layer_norm_fwd.default)
def layer_norm_fwd(x: Tensor, normalized_ndim: int, weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, rms: bool):
    xa = _widen(x)
    dims = list(range(x.dim() - normalized_ndim, x.dim()))
    if rms:
        rstd = torch.rsqrt((xa * xa).mean(dims, keepdim=True) + eps)
        y = xa * rstd
        mean = xa.new_empty((0,))
    else:
        mean, centered, var = _moments(xa, dims)
        rstd = torch.rsqrt(var + eps)
        y = centered * rstd
        mean = mean.reshape(-1)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype), mean, rstd.reshape(-1)


@register_decomposition(ops.group_norm_fwd.default)
def group_norm_fwd(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float):
    n = x.shape[0]
    # [N, C, *] -> [N, G, C/G * prod(*)]: each group's elements along the last dim
    mean, centered, var = _moments(_widen(x).reshape(n, num_groups, -1), [2])
    rstd = torch.rsqrt(var + eps)
    y = _channel_affine((centered * rstd).reshape(x.shape), weight, bias)
    return y.to(x.dtype), mean.reshape(n, num_groups), rstd.reshape(n, num_groups)


@register_decomposition(ops.batch_norm_fwd.default)
def batch_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    """Training forward: batch statistics over every dim but the channels (1); var biased."""
    mean, centered, var = _moments(_widen(x), [0] + list(range(2, x.dim())))
    invstd = torch.rsqrt(var + eps)
    y = _channel_affine(centered * invstd, weight, bias)
    return y.to(x.dtype), mean.reshape(-1), invstd.reshape(-1), var.reshape(-1)


@register_decomposition(ops.batch_norm_infer.default)
def batch_norm_infer(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                     bias: Optional[Tensor], eps: float):
    xa = _widen(x)
    y = (xa - _channel_view(mean, xa)) * torch.rsqrt(_channel_view(var, xa) + eps)
    return _channel_affine(y, weight, bias).to(x.dtype)
