"""``torch.nn.functional``-compatible norms on normkernels' own kernels.

Same signatures and defaults as ``torch.nn.functional``; bad input raises the exception type torch
raises, before any kernel runs. Running statistics are updated here, in place, with no graph,
exactly as torch does (momentum, unbiased running variance); the ops themselves are functional.

Every function here can be compiled by ``torch.jit.script``, as torch.nn.functional's can (so the
nn modules can be too): each is an eager-only prelude under ``if not torch.jit.is_scripting():``
(the C++ fast path; ``__torch_function__`` handling, which lets tensor subclasses, torch function
modes and torch.fx's symbolic tracing see the call as one function, as torch's functionals do;
torch's argument checks, in Python TorchScript does not compile; the compiler skips that block)
followed by the part both share, which calls the op. Under
TorchScript the ops' own checks (csrc/cpu/register.cpp, normkernels/triton/checks.py) explain
bad arguments, with RuntimeErrors; torch's CUDA autocast policy (_autocast_fp32) and torch 2.6's
rms_norm dtype rules (_rms_norm_like_torch_2_6) apply in eager mode and torch.compile only.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _C, _ops, _sharding
from .backend import check_runnable as _check_backend

# The ops are called through the namespace (torch.ops.normkernels.<op>), which TorchScript
# resolves; it costs ~0.2 us a call more than a bound OpOverload, which TorchScript does not.
_ops_ns = _ops.ops

# The eager fast path (csrc/python_entry.cpp): validates a plain CPU call and runs the op through
# the dispatcher at C cost, or returns None and the Python path below handles (and explains)
# everything else. Dynamo cannot trace into C, so under torch.compile the Python path is used.
_is_compiling = torch.compiler.is_compiling


def _sharding_rules_for(x: Tensor) -> None:
    """Where x is a DTensor, our ops' sharding rules registered before an op sees it
    (normkernels/_sharding.py: registered lazily, as registering imports DTensor). A plain
    tensor costs one type test: this is on every call of the Python path (CUDA's included)."""
    if type(x) is not Tensor and not _is_compiling():
        _sharding.register_if_needed()


def _runnable(x: Tensor, op: str) -> None:
    """The Python path's checks of x's device (no kernel of the chosen backend runs it: raise)
    and of DTensor's sharding rules."""
    _check_backend(x, op)
    _sharding_rules_for(x)


__all__ = ["layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm", "sync_batch_norm"]


def _check_float(x: Tensor, op: str) -> None:
    if not x.is_floating_point():
        raise NotImplementedError(
            f"{op}: expected a floating-point input (float32, float64, float16 or bfloat16), "
            f"got {x.dtype}"
        )


def _check_param(p: Optional[Tensor], name: str, shape, op: str, what: str) -> None:
    if p is not None and tuple(p.shape) != tuple(shape):
        raise RuntimeError(
            f"{op}: expected {name} of shape {list(shape)} ({what}), got {list(p.shape)}"
        )


_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _check_param_dtypes(input: Tensor, params, op: str) -> None:
    """torch's CPU layer/group/batch/instance norms take their parameters (and batch norm's
    running statistics) all of one dtype: the input's, or fp32 for a half-precision input;
    anything else raises their RuntimeError (checked against torch over every combination of
    fp32/fp64/fp16/bf16 and absent, tests/test_functional.py). RMS norm, composite in torch,
    takes any."""
    if not input.is_cpu:
        return
    dtypes = {p.dtype for p in params if p is not None}
    if not dtypes:
        return
    allowed = {input.dtype, torch.float32} if input.dtype in _HALF_DTYPES else {input.dtype}
    if len(dtypes) == 1 and dtypes <= allowed:
        return
    if input.dtype == torch.float64 and dtypes == {torch.float32}:
        why = "all inputs must share same datatype"
    else:
        why = "expect parameter to have scalar type of Float"
    raise RuntimeError(
        f"{op}: mixed dtype (CPU): {why} (input {input.dtype}, parameters "
        f"{', '.join(sorted(str(d) for d in dtypes))}; give them the input's dtype"
        f"{', or float32' if input.dtype in _HALF_DTYPES else ''})"
    )


def _check_normalized(x: Tensor, normalized_shape: Sequence[int], op: str) -> int:
    k = len(normalized_shape)
    if k == 0:
        raise RuntimeError(
            f"{op}: expected normalized_shape to be at least 1-dimensional, i.e., containing at "
            f"least one element, but got normalized_shape = {list(normalized_shape)}"
        )
    if x.dim() < k or tuple(x.shape[x.dim() - k :]) != tuple(normalized_shape):
        raise RuntimeError(
            f"{op}: given normalized_shape={list(normalized_shape)}, expected input with shape "
            f"[*, {', '.join(str(d) for d in normalized_shape)}], but got input of size "
            f"{list(x.shape)}"
        )
    return k


def _normalized(normalized_shape) -> tuple:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def _rowwise_ok(input: Tensor, shape: tuple, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """One cheap test of everything layer_norm/rms_norm check, for the per-call fast path
    (a 1x768 call must cost no more than torch's); the slow path then says what is wrong."""
    k = len(shape)
    return (
        k > 0
        and input.is_floating_point()
        and input.is_cpu
        and input.shape[input.dim() - k :] == shape
        and (weight is None or weight.shape == shape)
        and (bias is None or bias.shape == shape)
    )


def _rowwise_errors(input, shape, weight, bias, op) -> int:
    _check_float(input, op)
    k = _check_normalized(input, shape, op)
    _check_param(weight, "weight", shape, op, "normalized_shape")
    _check_param(bias, "bias", shape, op, "normalized_shape")
    _check_backend(input, op)  # (its one caller, _row_norm_args, checks the sharding rules)
    return k


def layer_norm(
    input: Tensor,
    normalized_shape: List[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization over the last ``len(normalized_shape)`` dims (``F.layer_norm``)."""
    if not torch.jit.is_scripting():
        if not _is_compiling():
            y = _C.layer_norm(input, normalized_shape, weight, bias, eps, False)
            if y is not None:
                return y
        if has_torch_function_variadic(input, weight, bias):
            return handle_torch_function(layer_norm, (input, weight, bias), input,
                                         normalized_shape, weight=weight, bias=bias, eps=eps)
        input, weight, bias, ndim = _row_norm_args(input, normalized_shape, weight, bias, False,
                                                   "layer_norm")
    else:
        ndim = len(normalized_shape)
    return _ops_ns.layer_norm_fwd(input, ndim, weight, bias, eps, False)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: List[int],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """Root-mean-square normalization (``F.rms_norm``); ``eps=None`` is the machine epsilon
    of the accumulation type, as in torch (before 2.7: see _rms_norm_like_torch_2_6)."""
    if not torch.jit.is_scripting():
        if has_torch_function_variadic(input, weight):  # (before the arguments change)
            return handle_torch_function(rms_norm, (input, weight), input, normalized_shape,
                                         weight=weight, eps=eps)
        if _RMS_NORM_COMPOSITE:
            input, weight, eps = _rms_norm_like_torch_2_6(input, weight, eps)
        if eps is None:
            eps = _machine_eps(getattr(input, "dtype", torch.float32))
        if not _is_compiling():
            y = _C.layer_norm(input, normalized_shape, weight, None, eps, True)
            if y is not None:
                return y
        input, weight, _, ndim = _row_norm_args(input, normalized_shape, weight, None, True,
                                                "rms_norm")
    else:
        ndim = len(normalized_shape)
        if eps is None:
            eps = _machine_eps(input.dtype)
    return _ops_ns.layer_norm_fwd(input, ndim, weight, None, eps, True)[0]


def _row_norm_args(input, normalized_shape, weight, bias, rms: bool, op: str):
    """layer_norm/rms_norm's checks where the C++ fast path declined (or under torch.compile),
    raising torch's errors; returns the arguments for the op (layer norm's cast as CUDA autocast
    casts them) and the number of normalized dims."""
    if not rms:
        input, weight, bias = _autocast_fp32(input, weight, bias)
    shape = _normalized(normalized_shape)
    if not _rowwise_ok(input, shape, weight, bias):
        _rowwise_errors(input, shape, weight, bias, op)
    _sharding_rules_for(input)
    if not rms:
        _check_param_dtypes(input, (weight, bias), op)
    return input, weight, bias, len(shape)


def _machine_eps(dtype: torch.dtype) -> float:
    """rms_norm's eps=None: the machine epsilon of the accumulation type, fp64's for fp64 input
    and fp32's otherwise, as torch's. (Literals: TorchScript calls no torch.finfo and reads no
    float globals; a test compares them with torch.finfo.)"""
    return 2.220446049250313e-16 if dtype == torch.float64 else 1.1920928955078125e-07


# torch 2.6's rms_norm was a composite of elementwise ops; 2.7 made it one op with other
# semantics (measured on both, every dtype pair: tests/test_functional.py).
_RMS_NORM_COMPOSITE = torch.__version__ < (2, 7)


def _rms_norm_like_torch_2_6(input, weight, eps):
    """What torch 2.6's composite rms_norm did, that 2.7 changed: y takes the promoted dtype of
    input and weight (bf16 x with an fp32 weight gives fp32), and eps=None is the input dtype's
    own machine epsilon (bf16's 0.0078, not fp32's). Mixed dtypes are cast to the promoted one
    before our kernel, as torch's composite promoted them; the cast is differentiable."""
    if not (isinstance(input, Tensor) and input.is_floating_point()):
        return input, weight, eps  # the op's own checks explain
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    if weight is not None and weight.is_floating_point() and weight.dtype != input.dtype:
        dtype = torch.result_type(input, weight)
        input, weight = input.to(dtype), weight.to(dtype)
    return input, weight, eps


def _check_nc(input: Tensor, op: str) -> None:
    _check_float(input, op)
    if input.dim() < 2:
        raise RuntimeError(
            f"{op}: expected at least 2 dimensions for input tensor but received {input.dim()}"
        )


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Group normalization over (N, C, *) inputs (``F.group_norm``)."""
    if not torch.jit.is_scripting():
        if not _is_compiling():
            y = _C.group_norm(input, num_groups, weight, bias, eps)
            if y is not None:
                return y
        if has_torch_function_variadic(input, weight, bias):
            return handle_torch_function(group_norm, (input, weight, bias), input, num_groups,
                                         weight=weight, bias=bias, eps=eps)
        input, weight, bias = _autocast_fp32(input, weight, bias)
        _check_nc(input, "group_norm")
        channels = input.shape[1]
        if num_groups <= 0 or channels % num_groups != 0:
            raise RuntimeError(
                "group_norm: expected number of channels in input to be divisible by "
                f"num_groups, but got input of shape {list(input.shape)} and "
                f"num_groups={num_groups}"
            )
        _check_param(weight, "weight", (channels,), "group_norm", "one per channel")
        _check_param(bias, "bias", (channels,), "group_norm", "one per channel")
        _check_param_dtypes(input, (weight, bias), "group_norm")
        _runnable(input, "group_norm")
    elif input.dim() < 2:  # as torch's F.group_norm (the channel count below needs dim 1)
        raise RuntimeError(
            f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    # Unguarded, as in torch's F.group_norm: scripted, a guard around it (an If whose branch only
    # computes the check) failed the TorchScript-based ONNX exporter
    _verify_batch_size(
        [input.shape[0] * input.shape[1] // num_groups, num_groups] + list(input.shape[2:]))
    return _ops_ns.group_norm_fwd(input, num_groups, weight, bias, eps)[0]


# torch.autocast runs layer_norm and group_norm in fp32 on CUDA (its fp32 list: y is fp32 for a
# half input), and none of the norms on the CPU; batch, instance and RMS norm keep the input's
# dtype everywhere. Our ops have no autocast kernels (one op serves layer and RMS norm, and
# instance norm uses group norm's), so functional applies torch's policy to layer_norm and
# group_norm: what autocast would cast (a floating tensor on that device, not fp64) becomes
# fp32 before the op; the casts are differentiable, so gradients come back in the caller's
# dtypes, as torch's do. (The CPU fast paths never see CUDA tensors.)
_AUTOCAST_FP32_DEVICES = ("cuda",)


def _autocast_fp32(input, *tensors):  # (eager only: TorchScript does not compile *args)
    device = getattr(input, "device", None)
    if (device is None or device.type not in _AUTOCAST_FP32_DEVICES
            or not torch.is_autocast_enabled(device.type)):
        return (input,) + tensors
    return tuple(
        t.float() if (t is not None and t.is_floating_point() and t.dtype != torch.float64
                      and t.device.type == device.type) else t
        for t in (input,) + tensors
    )


def _verify_batch_size(size: List[int]) -> None:
    prod = size[0]
    for d in size[2:]:
        prod *= d
    if prod == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _verify_spatial_size(size: List[int]) -> None:
    prod = 1
    for d in size[2:]:
        prod *= d
    if prod == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {size}")


def _torch_refuses_one_running_statistic() -> bool:
    """Whether the installed torch refuses batch statistics given one running statistic without
    the other: recent torch raises ValueError; 2.6 updated the one given (as we then do)."""
    try:
        with torch.no_grad():
            torch.batch_norm(torch.zeros(2, 1), None, None, torch.zeros(1), None, True, 0.1, 1e-5,
                             False)
    except ValueError:
        return True
    return False


# asked once, at import (not while a caller traces or compiles)
_REFUSES_ONE_RUNNING_STATISTIC = _torch_refuses_one_running_statistic()


def _check_running_pair(running_mean, running_var) -> None:
    """Statistics from the batch with running statistics given both or neither, where the
    installed torch asks that."""
    if (running_mean is None) != (running_var is None) and _REFUSES_ONE_RUNNING_STATISTIC:
        raise ValueError("running_mean and running_var must either both be None or neither be None")


def _check_channel_args(input, running_mean, running_var, weight, bias, op) -> int:
    """Checks shared by the per-channel norms (batch, instance, sync batch); returns C."""
    _check_nc(input, op)
    channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.numel() != channels:
            raise RuntimeError(f"{op}: {name} should contain {channels} elements not {t.numel()}")
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            # torch's error (its running statistics are not differentiable inputs)
            raise RuntimeError(
                f"The function '{op}' is not differentiable with respect to argument '{name}'. "
                "This input cannot have requires_grad True."
            )
    _check_param(weight, "weight", (channels,), op, "one per channel")
    _check_param(bias, "bias", (channels,), op, "one per channel")
    return channels


def _update_running(running: Tensor, batch_value: Tensor, momentum: float,
                    batch_scale: float = 1.0) -> None:
    # torch's rule: running = momentum * batch + (1 - momentum) * running, the batch value scaled
    # by batch_scale (the variance's count / (count - 1)) within add_'s factor, as the C++ fast
    # path multiplies momentum * batch_scale first: on CUDA, where each op here is a launch,
    # scaling the batch value on its own cost one more a step. No no_grad block: the
    # statistics have no history and running statistics cannot require grad (checked), so no
    # graph is recorded anyway, and torch.export would keep the block as a set_grad_enabled
    # region that torch.export.load then refuses ("wrap_with_set_grad_enabled is missing val").
    batch = batch_value.detach()
    if batch.dtype != running.dtype:
        batch = batch.to(running.dtype)
    running.mul_(1.0 - momentum).add_(batch, alpha=momentum * batch_scale)


def _update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          mean: Tensor, biased_var: Tensor, count: int, momentum: float) -> None:
    """Running statistics from a batch of `count` values per channel: the mean, and the
    variance made unbiased (torch's rule). Nothing is updated for an empty batch. (The eager
    fast path applies the same rule in C++: update_running_stats in csrc/python_entry.cpp.)"""
    if count <= 0:
        return
    if running_mean is not None:
        _update_running(running_mean, mean, momentum)
    if running_var is not None:
        _update_running(running_var, biased_var, momentum, count / max(count - 1, 1))


def _normalize_with_running_stats(input: Tensor, running_mean: Optional[Tensor],
                                  running_var: Optional[Tensor], weight: Optional[Tensor],
                                  bias: Optional[Tensor], eps: float, missing: str) -> Tensor:
    """Batch norm's inference op (batch norm in eval, instance norm with use_input_stats=False);
    `missing`: the caller's error (torch's words) when a running statistic is absent."""
    if running_mean is None or running_var is None:
        raise RuntimeError(missing)
    return _ops_ns.batch_norm_infer(input, running_mean, running_var, weight, bias, eps)


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization (``F.batch_norm``): batch statistics when ``training`` (updating the
    running ones when given), running statistics otherwise."""
    if not torch.jit.is_scripting():
        if not _is_compiling():
            y = _C.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                              eps)
            if y is not None:
                return y
        if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
            return handle_torch_function(
                batch_norm, (input, running_mean, running_var, weight, bias), input, running_mean,
                running_var, weight=weight, bias=bias, training=training, momentum=momentum,
                eps=eps)
        _check_channel_args(input, running_mean, running_var, weight, bias, "batch_norm")
        if training:  # torch's ValueErrors come before the dtype checks' RuntimeErrors
            _verify_batch_size(list(input.shape))
            _check_running_pair(running_mean, running_var)
        _check_param_dtypes(input, (weight, bias, running_mean, running_var), "batch_norm")
        _runnable(input, "batch_norm")
    elif training:
        _verify_batch_size(list(input.shape))
    if not training:
        return _normalize_with_running_stats(
            input, running_mean, running_var, weight, bias, eps,
            "batch_norm: running_mean and running_var must be given in evaluation mode "
            "(training=False)")
    y, mean, _invstd, var = _ops_ns.batch_norm_fwd(input, weight, bias, eps)
    count = input.numel() // max(input.shape[1], 1)  # (the op has checked there is a dim 1)
    _update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y


def instance_norm(
    input: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance normalization (``F.instance_norm``): group norm with one channel per group, or,
    with ``use_input_stats=False``, batch norm with the running statistics."""
    if not torch.jit.is_scripting():
        if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
            return handle_torch_function(
                instance_norm, (input, running_mean, running_var, weight, bias), input,
                running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
                use_input_stats=use_input_stats, momentum=momentum, eps=eps)
        _check_channel_args(input, running_mean, running_var, weight, bias, "instance_norm")
        if use_input_stats:  # torch's ValueErrors come before the dtype checks' RuntimeErrors
            _verify_spatial_size(list(input.shape))
            _check_running_pair(running_mean, running_var)
        # torch ignores the running statistics' dtype here (it updates them out of place)
        _check_param_dtypes(input, (weight, bias), "instance_norm")
        _runnable(input, "instance_norm")
    else:
        if input.dim() < 2:  # (the channel count below needs dim 1)
            raise RuntimeError(
                f"instance_norm: expected at least 2 dimensions for input tensor but received "
                f"{input.dim()}"
            )
        if use_input_stats:
            _verify_spatial_size(list(input.shape))
    if not use_input_stats:
        return _normalize_with_running_stats(
            input, running_mean, running_var, weight, bias, eps,
            "instance_norm: expected running_mean and running_var to be defined when "
            "use_input_stats is false")
    channels = input.shape[1]
    y, mean, rstd = _ops_ns.group_norm_fwd(input, channels, weight, bias, eps)
    count = input.numel() // max(input.shape[0] * channels, 1)
    if input.shape[0] > 0 and count > 0 and (running_mean is not None or running_var is not None):
        if running_mean is not None:
            _update_running(running_mean, mean.mean(0), momentum)
        if running_var is not None:
            # per-instance biased variance back from rstd, in fp64 to keep its digits
            var = rstd.detach().double().pow(-2).sub_(eps).clamp_(min=0)
            _update_running(running_var, var.mean(0), momentum, count / max(count - 1, 1))
    return y


class _SyncBatchNorm(torch.autograd.Function):
    """Batch norm with statistics over every rank of a process group (training).

    forward : local per-channel (count, mean, M2) from our kernel, all_gather, Chan merge (each
              rank merges the same numbers in the same order, so all agree bitwise), then our
              inference kernel normalizes with the global statistics.
    backward: local sum(dy) and sum(dy * (x - mean)) from our backward kernel, all_reduce, then
              dx from the global sums. dweight/dbias stay local, as in torch (DDP averages them).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, world_size):
        import torch.distributed as dist

        channels = x.shape[1]
        _, mean, _, var = _ops_ns.batch_norm_fwd(x, None, None, eps)
        count = torch.full_like(mean, x.numel() // max(channels, 1))
        local = torch.stack([count, mean, var * count])  # [3, C]: n, mean, M2
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=group)
        n_i, mean_i, m2_i = torch.stack(gathered).unbind(1)  # each [world, C]
        n = n_i.sum(0)
        g_mean = (n_i * mean_i).sum(0) / n
        g_var = (m2_i.sum(0) + (n_i * (mean_i - g_mean) ** 2).sum(0)) / n
        y = _ops_ns.batch_norm_infer(x, g_mean, g_var, weight, bias, eps)
        invstd = torch.rsqrt(g_var + eps)
        ctx.save_for_backward(x, weight, g_mean, invstd, n)
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.mark_non_differentiable(g_mean, g_var, n)
        return y, g_mean, g_var, n

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        import torch.distributed as dist

        x, weight, mean, invstd, n = ctx.saved_tensors
        channels = x.shape[1]
        ones = torch.ones(channels, dtype=mean.dtype, device=x.device)
        # local sums: dbias = sum(dy), dweight (with weight 1) = sum(dy * (x - mean)) * invstd
        _, dw1, db = _ops_ns.batch_norm_bwd(dy, x, mean, invstd, ones, True, [False, True, True])
        sums = torch.stack([db.to(mean.dtype), dw1.to(mean.dtype) / invstd])
        local_dw = (sums[1] * invstd).to(weight.dtype) if weight is not None else None
        # clone: the all_reduce below works in place on `sums`
        local_db = sums[0].to(weight.dtype if weight is not None else x.dtype).clone() if ctx.has_bias else None
        dx = None
        if ctx.needs_input_grad[0]:
            dist.all_reduce(sums, group=ctx.group)
            sum_dy, sum_dy_xmu = sums[0], sums[1]
            k = invstd * (weight.to(mean.dtype) if weight is not None else ones)
            shape = [1, channels] + [1] * (x.dim() - 2)
            # dx = k * (dy - sum(dy)/n - (x - mean) * invstd^2 * sum(dy * (x - mean))/n)
            dx_dy = _ops_ns.batch_norm_bwd(dy, x, mean, invstd, weight, False,
                                           [True, False, False])[0]
            dx = (dx_dy - (k * sum_dy / n).view(shape)
                  - (x - mean.view(shape)) * (k * invstd * invstd * sum_dy_xmu / n).view(shape)).to(x.dtype)
        return dx, local_dw if ctx.needs_input_grad[1] else None, local_db if ctx.needs_input_grad[2] else None, None, None, None


def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group=None,
) -> Tensor:
    """Training batch norm whose statistics span every rank of ``process_group`` (default: the
    world), as ``torch.nn.SyncBatchNorm`` computes them; updates the running statistics with the
    global ones. (No torch.nn.functional twin: torch keeps this inside the module.)"""
    import torch.distributed as dist

    _check_channel_args(input, running_mean, running_var, weight, bias, "sync_batch_norm")
    _runnable(input, "sync_batch_norm")
    group = process_group or dist.group.WORLD
    world_size = dist.get_world_size(group)
    y, mean, var, n = _SyncBatchNorm.apply(input, weight, bias, eps, group, world_size)
    total = int(n[0].item()) if n.numel() else 0
    if total > 1:  # one value per channel over all ranks leaves the running statistics alone
        _update_running_stats(running_mean, running_var, mean, var, total, momentum)
    return y
