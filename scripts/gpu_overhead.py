"""Host-side costs of a CUDA step, piece by piece: what a Triton launch costs through
JITFunction.run against its compiled kernel launched directly, per argument; a torch.empty; a
torch op; and (with normkernels built) our ops called directly, through `functional`, and
forward+backward, beside torch's. Each figure is the host time per call of a loop of calls whose
GPU work is tiny (so the GPU never holds the host back), median of 5 loops. For designing the
launch path of normkernels' Triton kernels; run from the repository root on a CUDA machine:

    python3 scripts/gpu_overhead.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CALLS = 2000


def per_call_us(fn, calls: int = CALLS) -> float:
    fn()
    torch.cuda.synchronize()
    loops = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        loops.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(loops)


@triton.jit
def _four_args(X, Y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n), mask=i < n)


@triton.jit
def _twenty_args(X, Y, A, B, C, D, E, F, n, k1, k2, k3, k4, k5, f1, f2,
                 P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n), mask=i < n)


def report(name: str, fn) -> None:
    try:
        print(f"{per_call_us(fn):8.1f} us  {name}")
    except Exception as e:  # keep going: one API mismatch must not hide the other figures
        print(f"  failed  {name}: {type(e).__name__}: {str(e)[:200]}")


def triton_launches() -> None:
    x = torch.randn(1024, device="cuda")
    y = torch.empty_like(x)
    ps = [torch.empty(16, device="cuda") for _ in range(6)]
    report("Triton launch, 4 args, kernel[grid](...)", lambda: _four_args[(1,)](x, y, 1024, BLOCK=1024))
    args20 = (x, y, *ps, 1024, 3, 5, 7, 9, 11, 0.5, 0.25)
    report("Triton launch, 20 args, kernel[grid](...)",
           lambda: _twenty_args[(1,)](*args20, P1=True, P2=False, P3=4, BLOCK=1024))



def triton_direct_launch() -> None:
    """The compiled kernel launched directly, every argument bound as JITFunction.run binds them
    (Triton 3.3+: constexprs included). Last: a wrong binding could fault the context."""
    x = torch.randn(1024, device="cuda")
    y = torch.empty_like(x)
    ps = [torch.empty(16, device="cuda") for _ in range(6)]
    args20 = (x, y, *ps, 1024, 3, 5, 7, 9, 11, 0.5, 0.25)
    compiled = _twenty_args[(1,)](*args20, P1=True, P2=False, P3=4, BLOCK=1024)
    launch = compiled[(1, 1, 1)]
    report("Triton launch, 20 args, compiled[grid](*args) (its kernel object, bound once)",
           lambda: launch(*args20, True, False, 4, 1024))
    torch.cuda.synchronize()
    assert torch.equal(y, x), "the direct launch did not copy x"


def torch_costs() -> None:
    x = torch.randn(1024, device="cuda")
    report("torch.empty((1024,), device=cuda)", lambda: torch.empty((1024,), device="cuda"))
    report("torch.empty_like(x)", lambda: torch.empty_like(x))
    report("x.contiguous() (already contiguous)", lambda: x.contiguous())
    report("x.add_(1) (one launch)", lambda: x.add_(1))


def normkernels_costs() -> None:
    import torch.nn.functional as TF

    import normkernels.functional as NF

    ops = torch.ops.normkernels
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 768, device="cuda", dtype=dtype)
        w = torch.randn(768, device="cuda", dtype=dtype)
        b = torch.randn(768, device="cuda", dtype=dtype)
        dt = str(dtype).replace("torch.", "")
        report(f"layer norm 1x768 {dt}: torch.ops.normkernels.layer_norm_fwd",
               lambda: ops.layer_norm_fwd(x, 1, w, b, 1e-5, False))
        report(f"layer norm 1x768 {dt}: normkernels.functional.layer_norm",
               lambda: NF.layer_norm(x, (768,), w, b))
        report(f"layer norm 1x768 {dt}: torch F.layer_norm", lambda: TF.layer_norm(x, (768,), w, b))
    x = torch.randn(2, 64, 4, 4, device="cuda")
    w = torch.randn(64, device="cuda")
    report("group norm 2x64x4x4: torch.ops.normkernels.group_norm_fwd",
           lambda: ops.group_norm_fwd(x, 32, w, w, 1e-5))
    report("group norm 2x64x4x4: normkernels.functional.group_norm", lambda: NF.group_norm(x, 32, w, w))
    report("group norm 2x64x4x4: torch F.group_norm", lambda: TF.group_norm(x, 32, w, w))
    rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
    report("batch norm 2x64x4x4 train: normkernels.functional.batch_norm",
           lambda: NF.batch_norm(x, rm, rv, w, w, True))
    report("batch norm 2x64x4x4 train: torch F.batch_norm", lambda: TF.batch_norm(x, rm, rv, w, w, True))
    xg = torch.randn(1, 768, device="cuda", requires_grad=True)
    wg = torch.randn(768, device="cuda", requires_grad=True)
    dy = torch.randn(1, 768, device="cuda")
    for label, F in (("normkernels", NF), ("torch", TF)):
        report(f"layer norm 1x768 forward+backward (autograd.grad): {label}",
               lambda: torch.autograd.grad(F.layer_norm(xg, (768,), wg, wg), (xg, wg), dy))


if __name__ == "__main__":
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; "
          f"host us per call, median of 5 loops of {CALLS}")
    triton_launches()
    torch_costs()
    if "--no-normkernels" not in sys.argv:
        normkernels_costs()
    triton_direct_launch()
