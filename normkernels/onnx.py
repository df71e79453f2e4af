"""ONNX export of models whose norms are ours, by either of torch's exporters.

Plain ``torch.onnx.export(model, args, "model.onnx")`` works with its torch.export-based
exporter (``dynamo=True``, the default from torch 2.9 on): each of our forward ops has a
decomposition into ATen ops in torch's table (normkernels/_decompositions.py), which the
exporter applies to any op it has no ONNX function for, then translates as it does torch's own
modules: a converted model exports to the same normalization operators (LayerNormalization,
InstanceNormalization, BatchNormalization) as the torch.nn one.

The legacy TorchScript-based exporter (``dynamo=False``, the default before torch 2.9) knows no
decompositions; it asks a registry for a "symbolic" function of each op it meets in the traced
or scripted graph. This module registers one for each of our forward ops (at import of
normkernels), built on torch's own symbolics of the ATen ops a torch.nn module's graph holds
(``group_norm``, ``batch_norm``) or written as those give them, so the output is what the
torch.nn model's export would be: LayerNormalization from opset 17 on (elementary before, as
torch's), InstanceNormalization inside group norm's reshapes, BatchNormalization. What torch has
no symbolic for is written in elementary operators: RMSNorm (torch's own RMSNorm does not export
with this exporter), batch norm's training forward, and the statistics outputs of every op (fp32,
fp64 for fp64 inputs; inference graphs read none, and the exporter drops what nothing reads).
Parameters and running statistics go in in the input's dtype, as the other exporter's
decompositions give them. Backward ops have none: exported graphs are inference graphs.

``export`` and ``translation_table`` remain from when our ops needed translations of their own;
neither is needed now.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List

import torch

__all__ = ["translation_table", "export"]


def translation_table() -> Dict[Any, Callable]:
    """An empty table: our ops no longer need translations of their own (torch.onnx.export
    decomposes them, see the module's docstring). Kept so callers passing it as
    ``custom_translation_table`` keep working."""
    warnings.warn("normkernels.onnx.translation_table() is no longer needed: torch.onnx.export "
                  "exports our ops as they are", DeprecationWarning, stacklevel=2)
    return {}


def export(model, args, f=None, **kwargs):
    """torch.onnx.export(model, args, f, dynamo=True, ...), the default exporter from torch 2.9
    on, whichever torch is installed; returns what torch.onnx.export returns (an ONNXProgram;
    None with dynamo=False, which works too)."""
    kwargs.setdefault("dynamo", True)
    return torch.onnx.export(model, args, f, **kwargs)


# ------------------------------------------------------------- the TorchScript-based exporter

# ONNX TensorProto element types (fixed by the ONNX spec) of the scalar types our ops take
_ONNX_TYPE = {"Float": 1, "Double": 11, "Half": 10, "BFloat16": 16}
_TORCH_DTYPE = {1: torch.float32, 11: torch.float64, 10: torch.float16, 16: torch.bfloat16}


def _types(x):
    """(x's ONNX type, its statistics' ONNX type and torch dtype): fp32, or fp64 for fp64."""
    scalar = x.type().scalarType()
    if scalar not in _ONNX_TYPE:
        raise RuntimeError(f"normkernels ONNX export: input of unknown or unsupported dtype "
                           f"({scalar}); trace the model with a floating-point example input")
    if scalar == "Double":
        return _ONNX_TYPE[scalar], _ONNX_TYPE["Double"], torch.float64
    return _ONNX_TYPE[scalar], _ONNX_TYPE["Float"], torch.float32


def _rank(x) -> int:
    from torch.onnx import symbolic_helper

    rank = symbolic_helper._get_tensor_rank(x)
    if rank is None:
        raise RuntimeError("normkernels ONNX export: the input's rank is unknown to the tracer")
    return rank


def _is_none(v) -> bool:
    from torch.onnx import symbolic_helper

    return symbolic_helper._is_none(v)


def _const(g, values, dtype=torch.int64):
    return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))


def _cast(g, v, onnx_type):
    return g.op("Cast", v, to_i=onnx_type)


def _param(g, p, x_type):
    """A weight, bias or running statistic in the input's type (None stays None)."""
    return p if _is_none(p) else _cast(g, p, x_type)


def _reduce_mean(g, v, axes: List[int], opset: int):
    """ReduceMean over axes, dimensions kept (axes an input from opset 18 on, an attribute
    before)."""
    if opset >= 18:
        return g.op("ReduceMean", v, _const(g, axes), keepdims_i=1)
    return g.op("ReduceMean", v, axes_i=axes, keepdims_i=1)


def _moments(g, xa, axes: List[int], eps: float, dtype: torch.dtype, opset: int, center=True):
    """(mean, rstd, var, xc) of xa over axes, dimensions kept, two-pass: var the mean square of
    the centered values xc. center=False (RMSNorm): mean None, xc = xa, var its mean square."""
    mean = _reduce_mean(g, xa, axes, opset) if center else None
    xc = g.op("Sub", xa, mean) if center else xa
    var = _reduce_mean(g, g.op("Mul", xc, xc), axes, opset)
    rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, _const(g, eps, dtype))))
    return mean, rstd, var, xc


def _flat(g, v):
    return g.op("Reshape", v, _const(g, [-1]))


def _layer_norm_fwd(opset: int):
    def symbolic(g, x, normalized_ndim, weight, bias, eps, rms):
        x_type, acc_type, acc_dtype = _types(x)
        rank = _rank(x)
        axes = list(range(rank - normalized_ndim, rank))
        xa = _cast(g, x, acc_type)
        mean, rstd, _, xc = _moments(g, xa, axes, eps, acc_dtype, opset, center=not rms)
        if opset >= 17 and not rms:
            # LayerNormalization, as torch's layer_norm exports from opset 17 on; its scale is
            # not optional: ones over the normalized dims (of whatever size) where no weight
            if _is_none(weight):
                normalized = g.op("Slice", g.op("Shape", x), _const(g, [-normalized_ndim]),
                                  _const(g, [rank]))
                scale = g.op("ConstantOfShape", normalized,
                             value_t=torch.ones(1, dtype=_TORCH_DTYPE[x_type]))
            else:
                scale = _cast(g, weight, x_type)
            inputs = [x, scale] + ([] if _is_none(bias) else [_cast(g, bias, x_type)])
            y = g.op("LayerNormalization", *inputs, axis_i=-normalized_ndim, epsilon_f=eps)
        else:  # elementary, as torch's layer_norm exports before opset 17: the affine in fp32
            y = g.op("Mul", xc, rstd)
            if not _is_none(weight):
                y = g.op("Mul", y, _cast(g, weight, acc_type))
            if not _is_none(bias):
                y = g.op("Add", y, _cast(g, bias, acc_type))
            y = _cast(g, y, x_type)
        # statistics with their dims kept, as the op returns them (x's leading dims, then ones)
        mean_out = g.op("Constant", value_t=torch.zeros(0, dtype=acc_dtype)) if rms else mean
        return y, mean_out, rstd

    return symbolic


def _group_norm_fwd(opset: int):
    def symbolic(g, x, num_groups, weight, bias, eps):
        from torch.onnx import symbolic_opset9

        x_type, acc_type, acc_dtype = _types(x)
        y = symbolic_opset9.group_norm(g, x, num_groups, _param(g, weight, x_type),
                                       _param(g, bias, x_type), eps, False)
        # statistics per (sample, group): [N, num_groups]
        grouped = g.op("Reshape", _cast(g, x, acc_type), _const(g, [0, num_groups, -1]))
        mean, rstd, _, _ = _moments(g, grouped, [2], eps, acc_dtype, opset)
        per_group = _const(g, [-1, num_groups])
        return y, g.op("Reshape", mean, per_group), g.op("Reshape", rstd, per_group)

    return symbolic


def _batch_norm_infer(opset: int):
    def symbolic(g, x, mean, var, weight, bias, eps):
        from torch.onnx import symbolic_opset9

        x_type, _, _ = _types(x)
        return symbolic_opset9.batch_norm(g, x, _param(g, weight, x_type), _param(g, bias, x_type),
                                          _cast(g, mean, x_type), _cast(g, var, x_type), False,
                                          0.1, eps, False)

    return symbolic


def _batch_norm_fwd(opset: int):
    def symbolic(g, x, weight, bias, eps):
        x_type, acc_type, acc_dtype = _types(x)
        rank = _rank(x)
        xa = _cast(g, x, acc_type)
        mean, rstd, var, xc = _moments(g, xa, [0] + list(range(2, rank)), eps, acc_dtype, opset)
        y = g.op("Mul", xc, rstd)
        per_channel = _const(g, [1, -1] + [1] * (rank - 2))  # broadcast along dim 1
        if not _is_none(weight):
            y = g.op("Mul", y, g.op("Reshape", _cast(g, weight, acc_type), per_channel))
        if not _is_none(bias):
            y = g.op("Add", y, g.op("Reshape", _cast(g, bias, acc_type), per_channel))
        return _cast(g, y, x_type), _flat(g, mean), _flat(g, rstd), _flat(g, var)

    return symbolic


def _register_torchscript_symbolics() -> None:
    """Registers each forward op's symbolic for the legacy exporter, once for each range of
    opsets whose operators differ (9: ReduceMean's axes an attribute; 17: LayerNormalization;
    18: ReduceMean's axes an input). A torch without that exporter gets nothing."""
    register = getattr(torch.onnx, "register_custom_op_symbolic", None)
    if register is None:
        return
    from torch.onnx import symbolic_helper

    parse = symbolic_helper.parse_args
    signatures = {
        "layer_norm_fwd": (_layer_norm_fwd, ("v", "i", "v", "v", "f", "b")),
        "group_norm_fwd": (_group_norm_fwd, ("v", "i", "v", "v", "f")),
        "batch_norm_infer": (_batch_norm_infer, ("v", "v", "v", "v", "v", "f")),
        "batch_norm_fwd": (_batch_norm_fwd, ("v", "v", "v", "f")),
    }
    for opset in (9, 17, 18):
        for name, (make, args) in signatures.items():
            register(f"normkernels::{name}", parse(*args)(make(opset)), opset)


_register_torchscript_symbolics()
