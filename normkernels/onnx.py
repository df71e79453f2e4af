"""ONNX export of models whose norms are ours.

torch.onnx's exporter (``dynamo=True``: torch.export, then a translation of each op to ONNX)
knows ATen's ops, not ours, and stops at the first one ("No ONNX function found for
normkernels.layer_norm_fwd"). This module gives it a translation of each of our forward ops into
standard ONNX operators (opset 18: ReduceMean, Sub, Mul, ...), which any ONNX runtime runs:
the exported file no longer needs normkernels, and its graph is what torch's own norm modules
export to, up to the choice of primitive ops. Statistics are computed in fp32 for fp16/bf16
inputs (fp64 for fp64), as our kernels do, and variances two-pass (mean of squared deviations).

    torch.onnx.export(model, args, dynamo=True,
                      custom_translation_table=normkernels.onnx.translation_table())
    # or, the same:
    normkernels.onnx.export(model, args, "model.onnx")

Backward ops are not translated: ONNX graphs are inference graphs. Needs the packages ``onnx``
and ``onnxscript`` (the exporter's own requirements). The legacy TorchScript-based exporter
(``dynamo=False``) is not supported: it is deprecated, and ``normkernels.revert(model)`` gives a
model it can export.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch

__all__ = ["translation_table", "export"]


def _onnx_modules():
    try:
        from onnxscript import ir
        from onnxscript import opset18 as op
    except ImportError as e:  # pragma: no cover - exercised only without onnxscript
        raise ImportError(
            "normkernels.onnx needs the packages onnx and onnxscript, as torch.onnx.export(..., "
            "dynamo=True) does: pip install onnx onnxscript") from e
    return op, ir


def translation_table() -> Dict[Any, Callable]:
    """{our forward op: its ONNX translation}, for torch.onnx.export's custom_translation_table."""
    op, ir = _onnx_modules()
    half = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

    def widen(x):
        """x in its accumulation type (fp32 for fp16/bf16, else its own), and the cast back."""
        if x.dtype in half:
            return op.Cast(x, to=ir.DataType.FLOAT), lambda t: op.Cast(t, to=x.dtype)
        return x, lambda t: t

    def scalar(value, ref):
        return op.CastLike(op.Constant(value_float=float(value)), ref)

    def moments(x, axes):
        """Mean and biased variance over axes (kept as size-1 dims), two-pass."""
        mean = op.ReduceMean(x, axes, keepdims=1)
        centered = op.Sub(x, mean)
        return mean, centered, op.ReduceMean(op.Mul(centered, centered), axes, keepdims=1)

    def rsqrt(var, eps):
        return op.Reciprocal(op.Sqrt(op.Add(var, scalar(eps, var))))

    def channel_view(p, rank):
        """[C] shaped [C, 1, ...], to broadcast over dim 1 of a rank-`rank` x."""
        if rank <= 2:
            return p
        return op.Unsqueeze(p, op.Constant(value_ints=list(range(1, rank - 1))))

    def affine(y, weight, bias, rank=None):
        if weight is not None:
            w = op.CastLike(weight, y)
            y = op.Mul(y, w if rank is None else channel_view(w, rank))
        if bias is not None:
            b = op.CastLike(bias, y)
            y = op.Add(y, b if rank is None else channel_view(b, rank))
        return y

    def flat(t):
        return op.Reshape(t, op.Constant(value_ints=[-1]))

    def layer_norm_fwd(x, normalized_ndim: int, weight=None, bias=None, eps: float = 1e-5,
                       rms: bool = False):
        xa, back = widen(x)
        axes = op.Constant(value_ints=list(range(-normalized_ndim, 0)))
        if rms:
            ms = op.ReduceMean(op.Mul(xa, xa), axes, keepdims=1)
            rstd = rsqrt(ms, eps)
            y = affine(op.Mul(xa, rstd), weight, None)
            # our op's mean for RMS norm: empty
            empty = op.CastLike(op.ConstantOfShape(op.Constant(value_ints=[0])), rstd)
            return back(y), empty, flat(rstd)
        mean, centered, var = moments(xa, axes)
        rstd = rsqrt(var, eps)
        y = affine(op.Mul(centered, rstd), weight, bias)
        return back(y), flat(mean), flat(rstd)

    def group_norm_fwd(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
        rank = len(x.shape)
        xa, back = widen(x)
        # [N, C, *] -> [N, G, C/G * prod(*)]: each group's elements along the last dim
        grouped = op.Reshape(xa, op.Constant(value_ints=[0, num_groups, -1]))
        mean, centered, var = moments(grouped, op.Constant(value_ints=[2]))
        rstd = rsqrt(var, eps)
        y = op.Reshape(op.Mul(centered, rstd), op.Shape(x))
        y = affine(y, weight, bias, rank)
        stats_shape = op.Constant(value_ints=[0, num_groups])
        return back(y), op.Reshape(mean, stats_shape), op.Reshape(rstd, stats_shape)

    def batch_norm_fwd(x, weight=None, bias=None, eps: float = 1e-5):
        """Training forward: batch statistics over every dim but the channels (1)."""
        rank = len(x.shape)
        xa, back = widen(x)
        axes = op.Constant(value_ints=[0] + list(range(2, rank)))
        mean, centered, var = moments(xa, axes)
        invstd = rsqrt(var, eps)
        y = affine(op.Mul(centered, invstd), weight, bias, rank)
        return back(y), flat(mean), flat(invstd), flat(var)

    def batch_norm_infer(x, mean, var, weight=None, bias=None, eps: float = 1e-5):
        rank = len(x.shape)
        xa, back = widen(x)
        mean, var = op.CastLike(mean, xa), op.CastLike(var, xa)
        centered = op.Sub(xa, channel_view(mean, rank))
        y = op.Mul(centered, channel_view(rsqrt(var, eps), rank))
        return back(affine(y, weight, bias, rank))

    ops = torch.ops.normkernels
    return {
        ops.layer_norm_fwd.default: layer_norm_fwd,
        ops.group_norm_fwd.default: group_norm_fwd,
        ops.batch_norm_fwd.default: batch_norm_fwd,
        ops.batch_norm_infer.default: batch_norm_infer,
    }


def export(model, args, f=None, **kwargs):
    """torch.onnx.export(model, args, f, dynamo=True, ...) with our ops' translations added to
    any custom_translation_table given; returns torch.onnx.export's ONNXProgram."""
    if kwargs.pop("dynamo", True) is not True:
        raise ValueError("normkernels.onnx.export: only the torch.export-based exporter "
                         "(dynamo=True) can take our ops' translations; for dynamo=False, export "
                         "normkernels.revert(model)")
    table = translation_table()  # a new dict each call
    table.update(kwargs.pop("custom_translation_table", None) or {})
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)
