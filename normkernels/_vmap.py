"""The op layer, Python side: batching rules (``torch.vmap``) for the forward ops.

Without them vmap runs an op once a sample (torch's fallback, with a performance warning).
Each rule folds the vmapped dim into a dim the kernel already loops over, so one kernel call
serves the whole batch:

- layer/RMS norm normalizes the trailing dims of every row: the vmapped dim becomes one more
  leading dim;
- group norm normalizes each (sample, group): the vmapped dim joins the batch dim N;
- batch norm (training) normalizes each channel over N and the spatial dims, so each vmapped
  instance needs its own channels: the vmapped dim joins the channel dim C, and unbatched weight
  and bias are repeated to match; in inference, where nothing is reduced, it joins N unless the
  running statistics or parameters are themselves vmapped (then it joins C too).

A weight or bias vmapped where the kernel takes one per layer (layer and group norm: model
ensembles under vmap) is applied after the kernel normalizes, by elementwise ops.
This module knows nothing of modules.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library that defines the schemas)

ops = torch.ops.normkernels


def _at(t, bdim, size, to=0):
    """t with its vmapped dim at `to`; an unbatched t expanded to `size` there."""
    if bdim is None:
        return t.unsqueeze(to).expand(*t.shape[:to], size, *t.shape[to:])
    return t.movedim(bdim, to)


def _batched(*dims) -> bool:
    return any(d is not None for d in dims)


def _affine(y, weight, wdim, bias, bdim, size, trailing):
    """y * weight + bias for a weight/bias vmapped (at wdim/bdim) or not; y has the vmapped dim
    first and `trailing` dims after the ones the parameters broadcast over."""

    def shaped(p, pdim):
        if p is None:
            return None
        if pdim is None:
            return p.reshape(*p.shape, *([1] * trailing))
        p = p.movedim(pdim, 0)
        return p.reshape(size, *([1] * (y.dim() - p.dim() - trailing)), *p.shape[1:], *([1] * trailing))

    out = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
    w, b = shaped(weight, wdim), shaped(bias, bdim)
    if w is not None:
        out = out * w
    if b is not None:
        out = out + b
    return out.to(y.dtype)


def _layer_norm_fwd_vmap(info, in_dims, x, normalized_ndim, weight, bias, eps, rms):
    xdim, _, wdim, bdim, _, _ = in_dims
    size = info.batch_size
    x = _at(x, xdim, size)
    affine_apart = _batched(wdim, bdim)
    y, mean, rstd = ops.layer_norm_fwd(
        x, normalized_ndim, None if affine_apart else weight, None if affine_apart else bias, eps, rms
    )
    if affine_apart:  # rounded once more for half inputs: y, then y * weight + bias
        y = _affine(y, weight, wdim, bias, bdim, size, trailing=0)
    mean_dim = None if rms else 0  # RMS norm's mean is an empty tensor
    if not rms:
        mean = mean.view(size, -1)
    return (y, mean, rstd.view(size, -1)), (0, mean_dim, 0)


def _group_norm_fwd_vmap(info, in_dims, x, num_groups, weight, bias, eps):
    xdim, _, wdim, bdim, _ = in_dims
    size = info.batch_size
    x = _at(x, xdim, size)
    affine_apart = _batched(wdim, bdim)
    y, mean, rstd = ops.group_norm_fwd(
        x.flatten(0, 1), num_groups, None if affine_apart else weight, None if affine_apart else bias, eps
    )
    y = y.unflatten(0, (size, -1))
    if affine_apart:
        y = _affine(y, weight, wdim, bias, bdim, size, trailing=x.dim() - 3)
    return (y, mean.unflatten(0, (size, -1)), rstd.unflatten(0, (size, -1))), (0, 0, 0)


def _per_channel(p, pdim, size):
    """A per-channel tensor for the channels of every vmapped instance: [size * C]."""
    if p is None:
        return None
    return p.repeat(size) if pdim is None else p.movedim(pdim, 0).flatten()


def _batch_norm_fwd_vmap(info, in_dims, x, weight, bias, eps):
    xdim, wdim, bdim, _ = in_dims
    size = info.batch_size
    x = _at(x, xdim, size, to=1).flatten(1, 2)  # [N, size * C, ...]
    y, mean, invstd, var = ops.batch_norm_fwd(
        x, _per_channel(weight, wdim, size), _per_channel(bias, bdim, size), eps
    )
    stats = tuple(s.view(size, -1) for s in (mean, invstd, var))
    return (y.unflatten(1, (size, -1)), *stats), (1, 0, 0, 0)


def _batch_norm_infer_vmap(info, in_dims, x, mean, var, weight, bias, eps):
    xdim, mdim, vdim, wdim, bdim, _ = in_dims
    size = info.batch_size
    if not _batched(mdim, vdim, wdim, bdim):  # only x: the vmapped dim joins N
        y = ops.batch_norm_infer(_at(x, xdim, size).flatten(0, 1), mean, var, weight, bias, eps)
        return y.unflatten(0, (size, -1)), 0
    x = _at(x, xdim, size, to=1).flatten(1, 2)
    y = ops.batch_norm_infer(
        x,
        _per_channel(mean, mdim, size),
        _per_channel(var, vdim, size),
        _per_channel(weight, wdim, size),
        _per_channel(bias, bdim, size),
        eps,
    )
    return y.unflatten(1, (size, -1)), 1


def register() -> None:
    """Registers the rules (torch >= 2.4 has torch.library.register_vmap; before it, vmap keeps
    its one-sample-at-a-time fallback)."""
    if not hasattr(torch.library, "register_vmap"):
        return
    for name, rule in (
        ("layer_norm_fwd", _layer_norm_fwd_vmap),
        ("group_norm_fwd", _group_norm_fwd_vmap),
        ("batch_norm_fwd", _batch_norm_fwd_vmap),
        ("batch_norm_infer", _batch_norm_infer_vmap),
    ):
        torch.library.register_vmap(f"normkernels::{name}", rule)


register()
