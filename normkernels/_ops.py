"""The op layer: fake (meta) kernels and autograd for every ``torch.ops.normkernels`` op.

The schemas are defined once in C++ (csrc/ops.cpp) and the CPU kernels registered there; this
module makes the ops traceable (``register_fake``: shapes, dtypes and memory formats exactly as the
real kernels produce them, so ``torch.compile`` and ``opcheck`` see the truth) and differentiable
(``register_autograd``: each forward op's backward is our own backward op). It knows nothing of
modules or of running statistics.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library that defines the schemas)

ops = torch.ops.normkernels


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics are fp32, or fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def walk_format(x: torch.Tensor, rows_2d: bool) -> torch.memory_format:
    """The memory format the C++ kernels walk x in, and give their outputs (see register.cpp)."""
    if x.dim() == 2 and rows_2d:
        return torch.contiguous_format
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _not_requested(x):
    return x.new_empty((0,))


def _param_grad(x, weight, shape, wanted):
    if not wanted:
        return _not_requested(x)
    dtype = weight.dtype if weight is not None else x.dtype
    return x.new_empty(shape, dtype=dtype)


# ------------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("normkernels::layer_norm_fwd")
def _layer_norm_fwd_fake(x, normalized_ndim, weight, bias, eps, rms):
    rows = 1
    for d in x.shape[: x.dim() - normalized_ndim]:
        rows *= d
    sdt = stats_dtype(x)
    mean = x.new_empty((0,) if rms else (rows,), dtype=sdt)
    return torch.empty_like(x, memory_format=torch.contiguous_format), mean, x.new_empty(
        (rows,), dtype=sdt
    )


@torch.library.register_fake("normkernels::layer_norm_bwd")
def _layer_norm_bwd_fake(dy, x, mean, rstd, weight, normalized_ndim, rms, output_mask):
    pshape = x.shape[x.dim() - normalized_ndim :]
    dx = (
        torch.empty_like(x, memory_format=torch.contiguous_format)
        if output_mask[0]
        else _not_requested(x)
    )
    dw = _param_grad(x, weight, pshape, output_mask[1] and weight is not None)
    db = _param_grad(x, weight, pshape, output_mask[2])
    return dx, dw, db


@torch.library.register_fake("normkernels::group_norm_fwd")
def _group_norm_fwd_fake(x, num_groups, weight, bias, eps):
    fmt = walk_format(x, rows_2d=False)
    sdt = stats_dtype(x)
    return (
        torch.empty_like(x, memory_format=fmt),
        x.new_empty((x.shape[0], num_groups), dtype=sdt),
        x.new_empty((x.shape[0], num_groups), dtype=sdt),
    )


@torch.library.register_fake("normkernels::group_norm_bwd")
def _group_norm_bwd_fake(dy, x, mean, rstd, weight, num_groups, output_mask):
    fmt = walk_format(x, rows_2d=False)
    dx = torch.empty_like(x, memory_format=fmt) if output_mask[0] else _not_requested(x)
    dw = _param_grad(x, weight, (x.shape[1],), output_mask[1] and weight is not None)
    db = _param_grad(x, weight, (x.shape[1],), output_mask[2])
    return dx, dw, db


@torch.library.register_fake("normkernels::batch_norm_fwd")
def _batch_norm_fwd_fake(x, weight, bias, eps):
    fmt = walk_format(x, rows_2d=True)
    sdt = stats_dtype(x)
    c = x.shape[1]
    return (
        torch.empty_like(x, memory_format=fmt),
        x.new_empty((c,), dtype=sdt),
        x.new_empty((c,), dtype=sdt),
        x.new_empty((c,), dtype=sdt),
    )


@torch.library.register_fake("normkernels::batch_norm_infer")
def _batch_norm_infer_fake(x, mean, var, weight, bias, eps):
    return torch.empty_like(x, memory_format=walk_format(x, rows_2d=True))


@torch.library.register_fake("normkernels::batch_norm_bwd")
def _batch_norm_bwd_fake(dy, x, mean, invstd, weight, train, output_mask):
    fmt = walk_format(x, rows_2d=True)
    dx = torch.empty_like(x, memory_format=fmt) if output_mask[0] else _not_requested(x)
    dw = _param_grad(x, weight, (x.shape[1],), output_mask[1] and weight is not None)
    db = _param_grad(x, weight, (x.shape[1],), output_mask[2])
    return dx, dw, db


# ------------------------------------------------------------------------------------ autograd


def _grads(mask, dx, dw, db):
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None)


def _layer_norm_setup(ctx, inputs, output):
    x, normalized_ndim, weight, bias, eps, rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.normalized_ndim, ctx.rms = normalized_ndim, rms
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], weight is not None and need[2], need[3]]
    dx, dw, db = ops.layer_norm_bwd(dy, x, mean, rstd, weight, ctx.normalized_ndim, ctx.rms, mask)
    dx, dw, db = _grads(mask, dx, dw, db)
    return dx, None, dw, db, None, None


torch.library.register_autograd(
    "normkernels::layer_norm_fwd", _layer_norm_backward, setup_context=_layer_norm_setup
)


def _group_norm_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.num_groups = num_groups
    ctx.mark_non_differentiable(mean, rstd)


def _group_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], weight is not None and need[2], need[3]]
    dx, dw, db = ops.group_norm_bwd(dy, x, mean, rstd, weight, ctx.num_groups, mask)
    dx, dw, db = _grads(mask, dx, dw, db)
    return dx, None, dw, db, None


torch.library.register_autograd(
    "normkernels::group_norm_fwd", _group_norm_backward, setup_context=_group_norm_setup
)


def _batch_norm_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, invstd, var = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.mark_non_differentiable(mean, invstd, var)


def _batch_norm_backward(ctx, dy, _dmean, _dinvstd, _dvar):
    x, weight, mean, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], weight is not None and need[1], need[2]]
    dx, dw, db = ops.batch_norm_bwd(dy, x, mean, invstd, weight, True, mask)
    dx, dw, db = _grads(mask, dx, dw, db)
    return dx, dw, db, None


torch.library.register_autograd(
    "normkernels::batch_norm_fwd", _batch_norm_backward, setup_context=_batch_norm_setup
)


def _batch_norm_infer_setup(ctx, inputs, output):
    x, mean, var, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight, mean, var)
    ctx.eps = eps


def _batch_norm_infer_backward(ctx, dy):
    x, weight, mean, var = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], weight is not None and need[3], need[4]]
    invstd = torch.rsqrt(var.to(stats_dtype(x)) + ctx.eps)
    dx, dw, db = ops.batch_norm_bwd(dy, x, mean, invstd, weight, False, mask)
    dx, dw, db = _grads(mask, dx, dw, db)
    return dx, None, None, dw, db, None


torch.library.register_autograd(
    "normkernels::batch_norm_infer", _batch_norm_infer_backward, setup_context=_batch_norm_infer_setup
)
