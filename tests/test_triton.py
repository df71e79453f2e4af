"""The Triton backend: its kernels really run (launch check), rows longer than one block,
deterministic results, launch heuristics, and — on a CUDA machine — the kernels on the GPU."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as TF

import normkernels
import normkernels.functional as NF
from samples import make_input

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton with a GPU or TRITON_INTERPRET=1",
)


# Where the tests below run the Triton kernels: compiled on the GPU where there is one (the
# interpreter is then off), interpreted on CPU tensors otherwise.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


def test_triton_kernels_actually_run():
    from normkernels.triton import LAUNCHES

    before = dict(LAUNCHES)
    model = normkernels.convert(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.GroupNorm(2, 8),
        torch.nn.Flatten(), torch.nn.LayerNorm(8 * 6 * 6))).to(DEVICE)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    with normkernels.backend("triton"):
        model(x).sum().backward()
        model.eval()
        model(x)
    ran = {k for k, v in LAUNCHES.items() if v > before.get(k, 0)}
    assert {"layer_norm_fwd", "layer_norm_bwd", "group_moments_partial", "batch_moments_partial",
            "moments_merge", "norm_affine", "channel_grad_sums", "group_grad_coeffs",
            "batch_grad_coeffs", "sum_rows"} <= ran, ran
    if DEVICE == "cpu":  # and outside the block the C++ kernels run again: no Triton launch
        snapshot = dict(LAUNCHES)
        model(x)
        assert dict(LAUNCHES) == snapshot


@pytest.mark.parametrize("rms", [False, True])
def test_rows_longer_than_one_block(rms):
    from normkernels.triton.heuristics import MAX_ROW_BLOCK

    n = MAX_ROW_BLOCK * 2 + 37
    x = (torch.randn(3, n, device=DEVICE) * 3 + 1).requires_grad_()
    w = torch.randn(n, device=DEVICE, requires_grad=True)
    dy = torch.randn(3, n, device=DEVICE)
    with normkernels.backend("triton"):
        y = NF.rms_norm(x, [n], w, 1e-5) if rms else NF.layer_norm(x, (n,), w)
        gx, gw = torch.autograd.grad(y, (x, w), dy)
    ref = TF.rms_norm(x, [n], w, 1e-5) if rms else TF.layer_norm(x, (n,), w)
    rx, rw = torch.autograd.grad(ref, (x, w), dy)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-4)


def test_results_are_bitwise_reproducible():
    x = make_input((4, 16, 6, 5), "channels_last", torch.float32).to(DEVICE).requires_grad_()
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    dy = torch.randn(4, 16, 6, 5, device=DEVICE)
    runs = []
    with normkernels.backend("triton"):
        for _ in range(2):
            y = NF.group_norm(x, 4, w, w) + NF.batch_norm(x, None, None, w, w, True)
            runs.append((y,) + torch.autograd.grad(y, (x, w), dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_heuristics():
    from normkernels.triton import heuristics as H

    assert [H.next_pow2(n) for n in (0, 1, 2, 3, 768, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]
    assert [H.cdiv(n, 4) for n in (0, 1, 4, 5, 8, 2**40 + 1)] == [0, 1, 1, 2, 2, 2**38 + 1]
    assert H.row_block(768) == 1024 and H.row_block(10**6) == H.MAX_ROW_BLOCK
    assert 1 <= H.row_warps(32) <= H.row_warps(1024) <= H.row_warps(8192) <= 16
    cpu = torch.device("cpu")
    # few statistics of many elements are split; many statistics are not
    assert H.split_count(2, 1 << 20, cpu) > 1
    assert H.split_count(10_000, 1 << 20, cpu) == 1
    assert H.split_count(2, 100, cpu) == 1  # never splits below min_elems per program
    assert H.programs_for_rows(3, cpu) == 3
    # runs of equal length, the last shorter, none empty
    assert [H.split_range(10, k) for k in (1, 3, 4, 20)] == [(10, 1), (4, 3), (3, 4), (1, 10)]
    bc, bk = H.tile_2d(320, channels_last=True)
    assert bc == 64 and bc * bk >= 2048
    assert H.tile_2d(320, channels_last=False)[0] <= 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_modules_match_torch(dtype):
    """The same comparison as test_parity, on the GPU (Triton kernels compiled for real)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.GroupNorm(32, 64),
        torch.nn.InstanceNorm2d(64, affine=True), torch.nn.Flatten(2), torch.nn.LayerNorm(32 * 32),
        torch.nn.RMSNorm(32 * 32)).cuda().to(dtype)
    import copy

    ours = normkernels.convert(copy.deepcopy(model))
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(8, 3, 32, 32, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
        y_ref, y = model(x), ours(x)
        tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
        torch.testing.assert_close(y.float(), y_ref.float(), **tol)
        y.float().square().mean().backward()
        y_ref.float().square().mean().backward()
        for p, q in zip(ours.parameters(), model.parameters()):
            torch.testing.assert_close(p.grad.float(), q.grad.float(), **tol)
            p.grad = q.grad = None
    compiled = torch.compile(ours, fullgraph=True)
    compiled(x).float().sum().backward()


def test_triton_launchers_register_as_the_cuda_kernels():
    """The import-time CUDA registration (normally only on GPU machines) succeeds for every op."""
    import subprocess
    import sys

    code = r"""
import torch
torch.cuda.is_available = lambda: True          # pretend, to exercise the registration path
import normkernels
from torch._C import _dispatch_has_kernel_for_dispatch_key as has_kernel
names = ["layer_norm_fwd", "layer_norm_bwd", "group_norm_fwd", "group_norm_bwd",
         "batch_norm_fwd", "batch_norm_infer", "batch_norm_bwd"]
missing = [n for n in names if not has_kernel(f"normkernels::{n}", "CUDA")]
assert not missing, missing
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_like_torch(dtype):
    """Under torch.autocast("cuda") every norm returns torch's dtype (layer and group norm fp32,
    the others the input's) and torch's values and gradients."""
    from test_functional import _AUTOCAST_CALLS

    torch.manual_seed(0)
    for name, (call, fp32) in _AUTOCAST_CALLS.items():
        x = torch.randn(5, 6, device="cuda").to(dtype).requires_grad_()
        w = torch.rand(6, device="cuda", requires_grad=True)
        b = torch.randn(6, device="cuda", requires_grad=True)
        outs = []
        for F in (torch.nn.functional, normkernels.functional):
            leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
            with torch.autocast("cuda", dtype=dtype):
                y = call(F, *leaves)
            grads = torch.autograd.grad(y.float().square().sum(), leaves, allow_unused=True)
            outs.append((y, grads))
        (y_ref, g_ref), (y, g) = outs
        assert y.dtype == y_ref.dtype == (torch.float32 if fp32 else dtype), name
        torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2, msg=name)
        for a, c in zip(g, g_ref):
            assert (a is None) == (c is None), name
            if a is not None:
                assert a.dtype == c.dtype, name
                torch.testing.assert_close(a, c, atol=5e-2, rtol=5e-2, msg=name)


def _launcher_calls():
    """(name, call, kernels it must launch) for each launcher, on inputs made beforehand."""
    from normkernels.triton import IMPLS

    x = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    w, mean_c, var_c = torch.randn(64), torch.zeros(64), torch.ones(64)
    mean_g, rstd_g = torch.zeros(2, 32), torch.ones(2, 32)
    rows, rw, rmean, rrstd = torch.randn(8, 96), torch.randn(96), torch.zeros(8), torch.ones(8)
    every = [True, True, True]
    return [
        ("group_norm_fwd", lambda: IMPLS["group_norm_fwd"](x, 32, w, w, 1e-5), 3),
        ("group_norm_bwd", lambda: IMPLS["group_norm_bwd"](dy, x, mean_g, rstd_g, w, 32, every), 5),
        ("batch_norm_fwd", lambda: IMPLS["batch_norm_fwd"](x, w, w, 1e-5), 3),
        ("batch_norm_infer", lambda: IMPLS["batch_norm_infer"](x, mean_c, var_c, w, w, 1e-5), 1),
        ("batch_norm_bwd", lambda: IMPLS["batch_norm_bwd"](dy, x, mean_c, var_c, w, True, every), 3),
        ("batch_norm_bwd eval dx", lambda: IMPLS["batch_norm_bwd"](
            dy, x, mean_c, var_c, w, False, [True, False, False]), 1),
        ("layer_norm_fwd", lambda: IMPLS["layer_norm_fwd"](rows, 1, rw, rw, 1e-5, False), 1),
        ("layer_norm_bwd", lambda: IMPLS["layer_norm_bwd"](rows, rows, rmean, rrstd, rw, 1, False, every), 3),
    ]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts launches in the interpreter")
def test_launchers_run_no_torch_ops_between_their_kernels(monkeypatch):
    """On a GPU every op a launcher runs is a launch, and the host cost of launches, not the
    kernels, set our speed on an H200 (group norm forward 10 launches, 7 of them torch ops that
    expanded statistics to channels or cast weights: bench/results/cuda-profile.txt). So a
    launcher may allocate and take views, and launch exactly its kernels, nothing more."""
    import triton.runtime.interpreter as interpreter

    from samples import OpRecorder

    kernels = []
    monkeypatch.setattr(interpreter.GridExecutor, "__call__",
                        lambda self, *args, **kwargs: kernels.append(self.fn.__name__))
    allowed = {"aten.empty.memory_format", "aten.new_empty.default", "aten.select.int",
               "aten.view.default"}
    for name, call, launches in _launcher_calls():
        kernels.clear()
        with OpRecorder() as ops:
            call()
        assert len(kernels) == launches, (name, kernels)
        assert set(ops.names) <= allowed, (name, sorted(set(ops.names) - allowed))
