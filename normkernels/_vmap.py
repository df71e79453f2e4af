"""The op layer, Python side: batching rules (``torch.vmap``) for the ops.

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
ensembles under vmap) is applied after the kernel normalizes, by elementwise ops. The backward
ops fold the same way for dx (batch norm: for all three); where layer or group norm's
per-instance dweight/dbias are asked, which one folded call would sum over every instance, the op
runs once an instance.
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


def _broadcast(p, pdim, size, ndim, trailing):
    """A weight or bias, vmapped at pdim or not, shaped to broadcast against a tensor of `ndim`
    dims with the vmapped dim first and `trailing` dims after the ones the parameter covers."""
    if p is None:
        return None
    if pdim is None:
        return p.reshape(*p.shape, *([1] * trailing))
    p = p.movedim(pdim, 0)
    return p.reshape(size, *([1] * (ndim - p.dim() - trailing)), *p.shape[1:], *([1] * trailing))


def _affine(y, weight, wdim, bias, bdim, size, trailing):
    """y * weight + bias for a weight/bias vmapped (at wdim/bdim) or not; y has the vmapped dim
    first (see _broadcast)."""
    out = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
    w = _broadcast(weight, wdim, size, y.dim(), trailing)
    b = _broadcast(bias, bdim, size, y.dim(), trailing)
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
    return (y, mean, rstd), (0, mean_dim, 0)  # statistics: x's leading dims, the vmapped first


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


# ------------------------------------------------------------------------ the backward ops
# (vmap of a backward: torch.func.vmap of grad for per-sample gradients, jacrev, is_grads_batched)


def _empty(x):  # an output that was not asked for (as the op gives it), not vmapped
    return x.new_empty((0,))


def _finish(x, outs, dims):
    """The outputs and their vmapped dims, with the not-requested ones empty and unbatched."""
    outs = tuple(_empty(x) if o is None or o.numel() == 0 else o for o in outs)
    return outs, tuple(None if o.numel() == 0 else d for o, d in zip(outs, dims))


def _param_grads_asked(output_mask, weight) -> bool:
    """Whether layer or group norm's backward is asked for dweight or dbias."""
    return bool(output_mask[2] or (output_mask[1] and weight is not None))


def _per_instance(op, size, args, in_dims, dims):
    """The op once per vmapped instance, stacked: for layer and group norm's dweight/dbias,
    which one folded call would sum over every instance. (Elementwise sums of dy * x-hat over
    the folded batch instead took longer than these calls: vmap of grad through a 64x128x768
    LayerNorm, bf16, 25.8 ms against 13.2.)"""
    pick = lambda i: [a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims)]  # noqa: E731
    outs = [op(*pick(i)) for i in range(size)]
    return _finish(args[1], tuple(torch.stack([o[k] for o in outs]) for k in range(3)), dims)


def _layer_norm_bwd_vmap(info, in_dims, dy, x, mean, rstd, weight, normalized_ndim, rms, output_mask):
    size = info.batch_size
    if _param_grads_asked(output_mask, weight):
        args = (dy, x, mean, rstd, weight, normalized_ndim, rms, output_mask)
        return _per_instance(ops.layer_norm_bwd, size, args, in_dims, (0, 0, 0))
    # dx alone: the vmapped dim becomes one more leading dim of the rows
    dyd, xd, md, rd, wd = in_dims[:5]
    dy, x = _at(dy, dyd, size), _at(x, xd, size)
    rstd = _at(rstd, rd, size).flatten()
    if not rms:
        mean = _at(mean, md, size).flatten()
    if wd is not None:  # vmapped weights: dx depends on them only through g = dy * weight
        dy, weight = dy * _broadcast(weight, wd, size, x.dim(), trailing=0), None
    mask = [bool(output_mask[0]), False, False]
    return _finish(x, ops.layer_norm_bwd(dy, x, mean, rstd, weight, normalized_ndim, rms, mask), (0, 0, 0))


def _group_norm_bwd_vmap(info, in_dims, dy, x, mean, rstd, weight, num_groups, output_mask):
    size = info.batch_size
    if _param_grads_asked(output_mask, weight):
        args = (dy, x, mean, rstd, weight, num_groups, output_mask)
        return _per_instance(ops.group_norm_bwd, size, args, in_dims, (0, 0, 0))
    # dx alone: the vmapped dim joins the samples
    dyd, xd, md, rd, wd = in_dims[:5]
    dy, x = _at(dy, dyd, size), _at(x, xd, size)  # [size, N, C, ...]
    mean, rstd = _at(mean, md, size).flatten(0, 1), _at(rstd, rd, size).flatten(0, 1)
    if wd is not None:  # as in layer norm
        dy, weight = dy * _broadcast(weight, wd, size, x.dim(), trailing=x.dim() - 3), None
    mask = [bool(output_mask[0]), False, False]
    dx, dw, db = ops.group_norm_bwd(dy.flatten(0, 1), x.flatten(0, 1), mean, rstd, weight, num_groups, mask)
    return _finish(x, (dx.unflatten(0, (size, -1)) if dx.numel() else dx, dw, db), (0, 0, 0))


def _batch_norm_bwd_vmap(info, in_dims, dy, x, mean, invstd, weight, train, output_mask):
    dyd, xd, md, rd, wd = in_dims[:5]
    size = info.batch_size
    # each vmapped instance its own channels (as in the forward rule): [N, size * C, ...]
    dy = _at(dy, dyd, size, to=1).flatten(1, 2)
    x = _at(x, xd, size, to=1).flatten(1, 2)
    dx, dw, db = ops.batch_norm_bwd(
        dy, x, _per_channel(mean, md, size), _per_channel(invstd, rd, size),
        _per_channel(weight, wd, size), train, output_mask,
    )
    dx = dx.unflatten(1, (size, -1)) if dx.numel() else dx
    dw = dw.view(size, -1) if dw.numel() else dw
    db = db.view(size, -1) if db.numel() else db
    return _finish(x, (dx, dw, db), (1, 0, 0))


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
        ("layer_norm_bwd", _layer_norm_bwd_vmap),
        ("group_norm_bwd", _group_norm_bwd_vmap),
        ("batch_norm_bwd", _batch_norm_bwd_vmap),
    ):
        torch.library.register_vmap(f"normkernels::{name}", rule)


register()
