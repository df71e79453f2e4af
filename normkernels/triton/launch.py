"""Small helpers for the Triton launchers: accumulation dtypes and the launch counter that
tests use to prove the Triton kernels actually ran."""
from __future__ import annotations

import collections

import torch
import triton.language as tl

LAUNCHES: "collections.Counter[str]" = collections.Counter()


def count_launch(name: str) -> None:
    LAUNCHES[name] += 1


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics and accumulation: fp32, or fp64 for fp64 inputs (as on the C++ path)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def tl_acc(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32
