"""The Triton launchers' own host time: argument checks, allocations, launch heuristics and
argument lists, with every Triton kernel launch replaced by a no-op. Runs on any machine with
Triton installed (CPU tensors, no GPU, no interpreter: nothing is launched), so changes to the
launchers' Python can be timed where no GPU is lent. What it leaves out is the launch itself
(JITFunction.run: 15-35 us a kernel on the H200 host, scripts/gpu_overhead.py) and the CUDA
caching allocator's cost per tensor (here the CPU allocator's). Per call, best of 7 loops:

    python3 scripts/launcher_overhead.py
"""
from __future__ import annotations

import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from normkernels.triton import batch_norm as B  # noqa: E402
from normkernels.triton import common as Cm  # noqa: E402
from normkernels.triton import group_norm as G  # noqa: E402
from normkernels.triton import layer_norm as L  # noqa: E402


class _NoLaunch:
    """Stands in for a JITFunction: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_kernels() -> int:
    stubbed = 0
    for module in (L, G, B, Cm):
        for name, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())
                stubbed += 1
    return stubbed


def per_call_us(fn, calls: int = 2000, loops: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main() -> None:
    torch.set_num_threads(1)
    print(f"{_stub_kernels()} kernels stubbed; torch {torch.__version__}, triton "
          f"{triton.__version__}")
    x, w, b = torch.randn(1, 768), torch.randn(768), torch.randn(768)
    _, ln_mean, ln_rstd = L.layer_norm_fwd(x, 1, w, b, 1e-5, False)
    xc, wc, bc = torch.randn(2, 64, 4, 4), torch.randn(64), torch.randn(64)
    _, gn_mean, gn_rstd = G.group_norm_fwd(xc, 32, wc, bc, 1e-5)
    _, bn_mean, bn_invstd, bn_var = B.batch_norm_fwd(xc, wc, bc, 1e-5)
    mask = [True, True, True]
    calls = {
        "torch.empty x3 (for scale)": lambda: (torch.empty(1, 768), torch.empty(1, 1),
                                               torch.empty(1, 1)),
        "layer_norm_fwd 1x768": lambda: L.layer_norm_fwd(x, 1, w, b, 1e-5, False),
        "layer_norm_bwd 1x768": lambda: L.layer_norm_bwd(x, x, ln_mean, ln_rstd, w, 1, False,
                                                         mask),
        "group_norm_fwd 2x64x4x4": lambda: G.group_norm_fwd(xc, 32, wc, bc, 1e-5),
        "group_norm_bwd 2x64x4x4": lambda: G.group_norm_bwd(xc, xc, gn_mean, gn_rstd, wc, 32,
                                                            mask),
        "batch_norm_fwd 2x64x4x4": lambda: B.batch_norm_fwd(xc, wc, bc, 1e-5),
        "batch_norm_bwd 2x64x4x4": lambda: B.batch_norm_bwd(xc, xc, bn_mean, bn_invstd, wc,
                                                            True, mask),
        "batch_norm_infer 2x64x4x4": lambda: B.batch_norm_infer(xc, bn_mean, bn_var, wc, bc,
                                                                1e-5),
    }
    for name, fn in calls.items():
        print(f"{per_call_us(fn):8.1f} us  {name}")


if __name__ == "__main__":
    main()
