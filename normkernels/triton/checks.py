"""The argument checks every op makes before any kernel runs, as csrc/cpu/register.cpp makes them
for the C++ kernels (same exception types and messages).

The kernels read parameters and statistics as flat arrays of a length the input decides, so a
wrong-sized one would be read past its end. ``normkernels.functional`` checks its arguments
first, with torch's messages; these guard direct calls of ``torch.ops.normkernels.*`` and
TorchScript, which call the ops themselves.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .launch import acc_dtype

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_float(x: torch.Tensor, op: str) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(
            f"{op}: expected a float32, float64, float16 or bfloat16 input, got {x.dtype}")


def check_nc(x: torch.Tensor, op: str) -> None:
    check_float(x, op)
    if x.dim() < 2:
        raise RuntimeError(f"{op}: expected an input of at least 2 dims (N, C, ...), got {x.dim()}")


def check_rows(x: torch.Tensor, normalized_ndim: int, op: str) -> None:
    check_float(x, op)
    if not 1 <= normalized_ndim <= x.dim():
        raise RuntimeError(f"{op}: normalized_ndim out of range")


def check_groups(x: torch.Tensor, num_groups: int, op: str) -> None:
    check_nc(x, op)
    if num_groups <= 0 or x.shape[1] % num_groups != 0:
        raise RuntimeError(
            f"{op}: expected number of channels in input to be divisible by num_groups, but got "
            f"input of shape {list(x.shape)} and num_groups={num_groups}")


def check_dy(dy: torch.Tensor, x: torch.Tensor, op: str) -> None:
    if dy.shape != x.shape:
        raise RuntimeError(f"{op}: dy and x differ in shape")
    _check_device(dy, x, op, "dy")


def check_param(p: Optional[torch.Tensor], shape: Sequence[int], x: torch.Tensor, op: str,
                name: str) -> None:
    if p is None:
        return
    if tuple(p.shape) != tuple(shape):
        raise RuntimeError(f"{op}: expected {name} of shape {list(shape)}, got {list(p.shape)}")
    if not p.is_floating_point():
        raise RuntimeError(f"{op}: expected a floating-point {name}, got {p.dtype}")
    _check_device(p, x, op, name)


def stats_arg(t: torch.Tensor, numel: int, x: torch.Tensor, op: str, name: str) -> torch.Tensor:
    """Statistics an op reads: `numel` values, as a contiguous tensor of the accumulation dtype
    (the tensor itself when it is one, as the forward ops return them)."""
    if t.numel() != numel:
        raise RuntimeError(f"{op}: expected {name} of {numel} values, got {t.numel()}")
    if not t.is_floating_point():
        raise RuntimeError(f"{op}: expected a floating-point {name}, got {t.dtype}")
    _check_device(t, x, op, name)
    return t.to(acc_dtype(x)).contiguous()


def _check_device(t: torch.Tensor, x: torch.Tensor, op: str, name: str) -> None:
    # a kernel handed a pointer of another device faults (or reads another device's memory)
    if t.device != x.device:
        raise RuntimeError(
            f"{op}: expected all tensors on one device, but x is on {x.device} and {name} on "
            f"{t.device}")
