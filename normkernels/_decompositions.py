"""The op layer: each forward op of ours written in ATen ops, registered as its decomposition in
torch's table (``torch._decomp``), for exporters to other runtimes.

Nothing that computes for a user runs these: eager calls, ``torch.compile`` (inductor keeps our
ops: it decomposes by its own list; a test reads its code) and ``torch.export`` (its default
``run_decompositions()`` keeps them too) all run our kernels. Tools that lower a graph to
another runtime decompose the ops they cannot translate by this table: the default
``torch.onnx.export`` (``dynamo=True``) does, so a converted model exports with no option and no
import of ours.

Where torch's own module exports to a normalization operator of the runtime, the decomposition
names the ATen op that the module's graph holds (``native_layer_norm``, ``native_group_norm``,
``_native_batch_norm_legit_no_training``), so a converted model exports to the same ONNX
operators as the torch.nn one (LayerNormalization, InstanceNormalization, BatchNormalization,
or folded into the convolution before it), which runtimes run as one fused kernel: ONNX
Runtime ran an elementary-op LayerNorm 8192x768 4.7x slower, a BatchNorm2d 16x64x56x56
inference 1.6x slower. Parameters and running statistics go in in the input's dtype, as ONNX's
operators take them (ATen's kernels still compute half inputs in fp32; the statistics these
return for half inputs are rounded to the input's dtype, which no inference graph reads; fp32
running statistics of a half model would be rounded too). RMSNorm (which torch exports to
elementary ops) and batch norm's training forward (whose biased variance ATen's ops do not
return) are written in elementary ops: statistics in fp32 for fp16/bf16 inputs (fp64 for
fp64), variance two-pass, one rounding to the input's dtype at the end.

Each returns what its op returns (shapes and dtypes of the fake kernels in _ops.py), so graphs
that read the statistics (batch norm's running-statistics update in training) export too.
Backward ops have none: exported graphs are inference graphs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch._decomp import register_decomposition

from ._ops import ops, stats_dtype, walk_format

aten = torch.ops.aten


def _param(p: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A weight, bias or running statistic in x's dtype: ONNX's normalization operators take
    them in the input's type (as torch's modules hold them)."""
    return None if p is None else p.to(x.dtype)


def _stats(t: Tensor, x: Tensor, *shape: int) -> Tensor:
    return t.to(stats_dtype(x)).reshape(shape)


@register_decomposition(ops.layer_norm_fwd.default)
def layer_norm_fwd(x: Tensor, normalized_ndim: int, weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, rms: bool):
    if not rms:
        shape = x.shape[x.dim() - normalized_ndim:]
        y, mean, rstd = aten.native_layer_norm(x, shape, _param(weight, x), _param(bias, x), eps)
        return y, mean.to(stats_dtype(x)), rstd.to(stats_dtype(x))  # shaped as ours
    xa = x.to(stats_dtype(x))
    dims = list(range(x.dim() - normalized_ndim, x.dim()))
    rstd = torch.rsqrt((xa * xa).mean(dims, keepdim=True) + eps)
    y = xa * rstd
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(x.dtype), xa.new_empty((0,)), rstd


@register_decomposition(ops.group_norm_fwd.default)
def group_norm_fwd(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float):
    n, c = x.shape[0], x.shape[1]
    hw = math.prod(x.shape[2:])
    # ATen's kernel takes x dense in its memory format (as F.group_norm hands it over)
    dense = x.contiguous(memory_format=walk_format(x, rows_2d=False))
    y, mean, rstd = aten.native_group_norm(dense, _param(weight, x), _param(bias, x), n, c, hw,
                                           num_groups, eps)
    return y, _stats(mean, x, n, num_groups), _stats(rstd, x, n, num_groups)


@register_decomposition(ops.batch_norm_fwd.default)
def batch_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    """Training forward: batch statistics over every dim but the channels (1); var biased."""
    xa = x.to(stats_dtype(x))
    dims = [0] + list(range(2, x.dim()))
    mean = xa.mean(dims, keepdim=True)
    centered = xa - mean
    var = (centered * centered).mean(dims, keepdim=True)
    invstd = torch.rsqrt(var + eps)
    y = centered * invstd
    view = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(view)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(view)
    return y.to(x.dtype), mean.reshape(-1), invstd.reshape(-1), var.reshape(-1)


@register_decomposition(ops.batch_norm_infer.default)
def batch_norm_infer(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                     bias: Optional[Tensor], eps: float):
    y, _, _ = aten._native_batch_norm_legit_no_training(
        x, _param(weight, x), _param(bias, x), _param(mean, x), _param(var, x), 0.0, eps)
    return y
