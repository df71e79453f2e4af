"""Drop-in replacements for the torch.nn norm modules.

Each class subclasses the torch.nn class it replaces (so ``isinstance`` checks, constructors,
parameters, buffers, ``state_dict`` keys, ``repr`` and pickling are torch's own) and overrides
only the step that computes, which goes through ``normkernels.functional``. Like torch's, every
one but SyncBatchNorm compiles with ``torch.jit.script``; the lazy ones become their eager twin
(``cls_to_become``) on their first call, as torch's become theirs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as F

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "GroupNorm", "LayerNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
    "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d",
]


_Proxy = torch.fx.Proxy


class _FxLeaf:
    """Under torch.fx symbolic tracing (the input is a Proxy), the module is one call_module
    node, as torch's norm modules are: FX keeps every module of torch.nn as a leaf, and would
    trace into ours (they live in normkernels.nn), whose checks cannot run on a Proxy.

    The test is in __call__, where FX's patch of nn.Module.__call__ would be (ours shadows it):
    like a leaf's, the module's hooks do not run on proxies at trace time, only when the traced
    module runs. TorchScript compiles forward alone; dynamo runs this or _call_impl (torch 2.6's
    strict torch.export failed where forward itself was overridden and called torch's)."""

    def __call__(self, *args, **kwargs):
        if (isinstance(args[0], _Proxy) if args else isinstance(kwargs.get("input"), _Proxy)):
            tracer = (args[0] if args else kwargs["input"]).tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), args, kwargs)
        return nn.Module.__call__(self, *args, **kwargs)  # (torch's, or FX's patch of it)


class _BatchNormForward(_FxLeaf):
    """torch.nn.modules.batchnorm._BatchNorm.forward, computing with normkernels."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        # batch statistics in training, and in eval when there are no running statistics
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    pass


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    pass


class SyncBatchNorm(_BatchNormForward, nn.SyncBatchNorm):
    """SyncBatchNorm on normkernels: in training under an initialized process group of more
    than one rank, statistics span every rank (F.sync_batch_norm); otherwise plain batch norm,
    as torch does."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = None
        if self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = self.process_group or torch.distributed.group.WORLD
            if torch.distributed.get_world_size(group) <= 1:
                group = None
        if group is None:
            return super().forward(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return F.sync_batch_norm(
            input,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.weight,
            self.bias,
            factor,
            self.eps,
            group,
        )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """torch's convert_sync_batchnorm (every batch norm inside ``module`` becomes a
        SyncBatchNorm with its state), giving ours: torch's builds torch.nn.SyncBatchNorm by
        name, whichever class it is called on."""
        module = super().convert_sync_batchnorm(module, process_group)
        for m in module.modules():
            if type(m) is nn.SyncBatchNorm:
                m.__class__ = cls
        return module


class GroupNorm(_FxLeaf, nn.GroupNorm):
    def forward(self, input: Tensor) -> Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(_FxLeaf, nn.LayerNorm):
    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(_FxLeaf, nn.RMSNorm):
    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class _InstanceNormApply(_FxLeaf):
    """torch.nn.modules.instancenorm._InstanceNorm._apply_instance_norm, computing with
    normkernels (torch's forward keeps its checks and its unbatched-input handling)."""

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        return F.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class InstanceNorm1d(_InstanceNormApply, nn.InstanceNorm1d):
    pass


class InstanceNorm2d(_InstanceNormApply, nn.InstanceNorm2d):
    pass


class InstanceNorm3d(_InstanceNormApply, nn.InstanceNorm3d):
    pass


# The lazy modules compute like their eager twins: the first call (the one that infers
# num_features) runs the class's own forward, before the class changes to cls_to_become.
class LazyBatchNorm1d(_BatchNormForward, nn.LazyBatchNorm1d):
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_BatchNormForward, nn.LazyBatchNorm2d):
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_BatchNormForward, nn.LazyBatchNorm3d):
    cls_to_become = BatchNorm3d


class LazyInstanceNorm1d(_InstanceNormApply, nn.LazyInstanceNorm1d):
    cls_to_become = InstanceNorm1d


class LazyInstanceNorm2d(_InstanceNormApply, nn.LazyInstanceNorm2d):
    cls_to_become = InstanceNorm2d


class LazyInstanceNorm3d(_InstanceNormApply, nn.LazyInstanceNorm3d):
    cls_to_become = InstanceNorm3d


# torch.nn class -> its normkernels twin (used by convert)
TWINS = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
    nn.GroupNorm: GroupNorm,
    nn.LayerNorm: LayerNorm,
    nn.RMSNorm: RMSNorm,
    nn.InstanceNorm1d: InstanceNorm1d,
    nn.InstanceNorm2d: InstanceNorm2d,
    nn.InstanceNorm3d: InstanceNorm3d,
    nn.LazyBatchNorm1d: LazyBatchNorm1d,
    nn.LazyBatchNorm2d: LazyBatchNorm2d,
    nn.LazyBatchNorm3d: LazyBatchNorm3d,
    nn.LazyInstanceNorm1d: LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d: LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d: LazyInstanceNorm3d,
}
