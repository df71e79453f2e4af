"""The [N, C, HW] view both batch and group norm launchers walk, mirroring csrc/cpu/register.cpp:
channels_last(_3d) inputs (and 2-D batch norm inputs) are walked as [N, HW, C], anything else is
made contiguous and walked as [N, C, HW]."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _ops  # (names looked up at call time: _ops imports this package as it loads)


@dataclass
class Walk:
    x: torch.Tensor  # dense in `fmt`
    fmt: torch.memory_format
    N: int
    C: int
    HW: int
    channels_last: bool
    sN: int
    sC: int
    sHW: int

    def like(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=self.fmt)

    def empty(self, dtype=None) -> torch.Tensor:
        return torch.empty(self.x.shape, dtype=dtype or self.x.dtype, device=self.x.device,
                           memory_format=self.fmt)


def walk(x: torch.Tensor, rows_2d: bool) -> Walk:
    fmt = _ops.walk_format(x, rows_2d)
    xc = x.contiguous(memory_format=fmt)
    N, C = x.shape[0], x.shape[1]
    HW = 1
    for d in x.shape[2:]:
        HW *= d
    channels_last = fmt != torch.contiguous_format or (x.dim() == 2 and rows_2d)
    if channels_last:
        return Walk(xc, fmt, N, C, HW, True, HW * C, 1, C)
    return Walk(xc, fmt, N, C, HW, False, C * HW, HW, 1)
