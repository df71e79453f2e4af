"""The op layer: DTensor sharding rules for every ``torch.ops.normkernels`` op.

With these, a DTensor reaching one of our ops (tensor or sequence parallelism, a module whose
parameters were distributed) runs our kernel on each rank's local tensors: DTensor picks the
rule whose input placements cost least to reach, redistributes to them, and labels the
outputs. Without them the forward ops would run their ATen decomposition and the backward ops
would fail. The rules are the ones torch's own norms have where torch has them, and they need
no communication inside the op:

- layer norm / RMS norm: x sharded along any dim it is not normalized over; the statistics
  (x's leading dims, then ones) sharded along the same dim; weight and bias replicated; their
  gradients partial sums (each rank holds its rows' share; DTensor adds them up when a
  replicated value is wanted). Sharded along a normalized dim, x is gathered first.
- group norm / instance norm: x sharded along the batch dim (a group's values stay on one rank).
- batch norm with batch statistics: x sharded along the channel dim, with the per-channel
  tensors; a batch split over ranks needs the statistics reduced across them, which is
  SyncBatchNorm's job, so x is gathered. With given statistics (inference) also x sharded
  along any other dim, the per-channel tensors replicated.
- every op: all replicated.

Registered when torch.distributed.tensor is imported (registering imports it, which would add
about half a second to ``import normkernels``): at our import if it already is, else right
after it is (_after_import.py), so a compiled model's first call or a direct op call
finds the rules too; the first functional call that sees a tensor subclass checks once more
(``register_if_needed``), for an import the hook did not see. Needs
``torch.distributed.tensor.experimental.register_sharding`` (torch 2.5 and later).
"""
from __future__ import annotations

import sys

import torch

from ._after_import import call_after_import
from ._ops import ops

_DTENSOR = "torch.distributed.tensor"
_registered = False


def register_if_needed() -> None:
    """Registers the rules if torch.distributed.tensor has been imported (for a caller that
    holds a tensor subclass, which may be a DTensor). A flag test once they are."""
    if not _registered and _DTENSOR in sys.modules:
        register()


def register() -> None:
    """Registers the sharding rules of every op (none where this torch has no register_sharding)."""
    global _registered
    if _registered:
        return
    try:
        from torch.distributed.tensor import Partial, Replicate, Shard
        from torch.distributed.tensor.experimental import register_sharding
    except ImportError:  # torch built without distributed, or older than 2.5
        return
    R, P = Replicate(), Partial()

    def param(t, placement=R):
        """The placement of an optional per-feature tensor: None where it is absent."""
        return None if t is None else placement

    def grads(mask, weight, sharded):
        """dweight and dbias: `sharded` where asked for (dweight only with a weight), else
        replicated (the op returns an empty tensor)."""
        return [sharded if mask[1] and weight is not None else R, sharded if mask[2] else R]

    @register_sharding(ops.layer_norm_fwd.default)
    def _layer_norm_fwd(x, normalized_ndim, weight, bias, eps, rms):
        rules = [([R, R, R], [R, None, param(weight), param(bias), None, None])]
        for d in range(x.ndim - normalized_ndim):
            # RMS norm's mean is an empty tensor: replicated
            rules.append(([Shard(d), R if rms else Shard(d), Shard(d)],
                          [Shard(d), None, param(weight), param(bias), None, None]))
        return rules

    @register_sharding(ops.layer_norm_bwd.default)
    def _layer_norm_bwd(dy, x, mean, rstd, weight, normalized_ndim, rms, output_mask):
        rules = [([R, R, R], [R, R, R, R, param(weight), None, None, None])]
        for d in range(x.ndim - normalized_ndim):
            rules.append(([Shard(d), *grads(output_mask, weight, P)],
                          [Shard(d), Shard(d), R if rms else Shard(d), Shard(d), param(weight),
                           None, None, None]))
        return rules

    @register_sharding(ops.group_norm_fwd.default)
    def _group_norm_fwd(x, num_groups, weight, bias, eps):
        return [([R, R, R], [R, None, param(weight), param(bias), None]),
                ([Shard(0), Shard(0), Shard(0)], [Shard(0), None, param(weight), param(bias), None])]

    @register_sharding(ops.group_norm_bwd.default)
    def _group_norm_bwd(dy, x, mean, rstd, weight, num_groups, output_mask):
        return [([R, R, R], [R, R, R, R, param(weight), None, None]),
                ([Shard(0), *grads(output_mask, weight, P)],
                 [Shard(0), Shard(0), Shard(0), Shard(0), param(weight), None, None])]

    C = Shard(0)  # a per-channel tensor split as x's channel dim (Shard(1)) is

    @register_sharding(ops.batch_norm_fwd.default)
    def _batch_norm_fwd(x, weight, bias, eps):
        return [([R, R, R, R], [R, param(weight), param(bias), None]),
                ([Shard(1), C, C, C], [Shard(1), param(weight, C), param(bias, C), None])]

    @register_sharding(ops.batch_norm_infer.default)
    def _batch_norm_infer(x, mean, var, weight, bias, eps):
        rules = [([R], [R, R, R, param(weight), param(bias), None]),
                 ([Shard(1)], [Shard(1), C, C, param(weight, C), param(bias, C), None])]
        for d in range(x.ndim):
            if d != 1:
                rules.append(([Shard(d)], [Shard(d), R, R, param(weight), param(bias), None]))
        return rules

    # `train` and output_mask are not part of DTensor's cache key for this op (it keys on the
    # arguments from the first int one on, and this op has none), so the rules must not depend
    # on them: channel sharding serves both (its gradients are per channel), and a batch split
    # in inference mode is gathered.
    @register_sharding(ops.batch_norm_bwd.default)
    def _batch_norm_bwd(dy, x, mean, invstd, weight, train, output_mask):
        return [([R, R, R], [R, R, R, R, param(weight), None, None]),
                ([Shard(1), C, C], [Shard(1), Shard(1), C, C, param(weight, C), None, None])]

    _registered = True


if torch.distributed.is_available():  # (DTensors may come at any call once it is imported)
    call_after_import(_DTENSOR, lambda module: register())
