"""The op layer, Python side: fake (meta) kernels for every ``torch.ops.normkernels`` op.

The schemas are defined once in C++ (csrc/ops.cpp), the CPU kernels registered there
(csrc/cpu/register.cpp), and autograd registered on the Autograd key in C++ (csrc/autograd.cpp:
each forward op's backward is our own backward op, at C++ cost per call). This module makes the
ops traceable: ``register_fake`` gives shapes, dtypes and memory formats exactly as the real
kernels produce them, so ``torch.compile`` and ``opcheck`` see the truth. It knows nothing of
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


def layer_norm_stats_shape(x: torch.Tensor, normalized_ndim: int) -> tuple:
    """Layer norm's mean and rstd, shaped as torch's native_layer_norm shapes them: x's leading
    dims, then a 1 for each normalized dim (so a DTensor sharded along a leading dim of x shards
    them along the same dim)."""
    lead = x.dim() - normalized_ndim
    return (*x.shape[:lead], *([1] * normalized_ndim))


@torch.library.register_fake("normkernels::layer_norm_fwd")
def _layer_norm_fwd_fake(x, normalized_ndim, weight, bias, eps, rms):
    sshape = layer_norm_stats_shape(x, normalized_ndim)
    sdt = stats_dtype(x)
    mean = x.new_empty((0,) if rms else sshape, dtype=sdt)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), mean,
            x.new_empty(sshape, dtype=sdt))


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


def _channel_grads_fake(x, weight, output_mask, rows_2d):
    """(dx, dweight, dbias) of the group and batch norm backward ops."""
    fmt = walk_format(x, rows_2d=rows_2d)
    dx = torch.empty_like(x, memory_format=fmt) if output_mask[0] else _not_requested(x)
    dw = _param_grad(x, weight, (x.shape[1],), output_mask[1] and weight is not None)
    db = _param_grad(x, weight, (x.shape[1],), output_mask[2])
    return dx, dw, db


@torch.library.register_fake("normkernels::group_norm_bwd")
def _group_norm_bwd_fake(dy, x, mean, rstd, weight, num_groups, output_mask):
    return _channel_grads_fake(x, weight, output_mask, rows_2d=False)


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
    return _channel_grads_fake(x, weight, output_mask, rows_2d=True)


# ------------------------------------------------------------------------------ CUDA (Triton)


def _register_cuda_kernels() -> None:
    """The Triton launchers as the CUDA implementation of every op (when a GPU and Triton are
    present; on CPU-only machines Triton is not even imported)."""
    from .backend import triton_installed

    if not (torch.cuda.is_available() and triton_installed()):
        return
    from . import triton as nk_triton

    for name, fn in nk_triton.IMPLS.items():
        torch.library.register_kernel(f"normkernels::{name}", "cuda", fn)


_register_cuda_kernels()
