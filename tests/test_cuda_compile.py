"""Every Triton kernel specialization our launchers choose compiles for the GPU (sm_90: H100,
H200) without register spills, checked with no GPU at all.

The interpreter runs our kernels as NumPy code, so it misses what only the GPU compiler sees:
types it cannot lower, shapes that are not compile-time constants, and register pressure. Here
the launchers are driven over the benchmark suite's shapes (fp32/bf16/fp16, forward and
backward) and some small ones, with each launch recorded instead of run; a subprocess without
the interpreter then compiles every distinct specialization through Triton's CUDA backend to a
cubin and reads ptxas's register report."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import normkernels
import normkernels.functional as NF

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="records launches under Triton's interpreter",
)

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
           torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}


def _record_launches(monkeypatch):
    """(module, kernel, signature, constexprs, launch options) of every launch of the bench
    suite's steps and a few small calls, recorded instead of run"""
    import triton.runtime.interpreter as interpreter

    specs = set()

    def record(self, *args, **kwargs):
        values = dict(zip(self.arg_names, args))
        values.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        signature, constexprs = {}, {}
        for name in self.arg_names:
            v = values.get(name)
            if name in self.constexprs or v is None:
                signature[name] = "constexpr"
                constexprs[name] = v if isinstance(v, (bool, int, float, type(None))) else str(v)
            elif isinstance(v, torch.Tensor):
                signature[name] = "*" + _DTYPES[v.dtype]
            elif isinstance(v, bool):
                signature[name] = "i1"
            elif isinstance(v, int):
                signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            else:
                signature[name] = "fp32"
        options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
        specs.add(json.dumps([self.fn.__module__, self.fn.__name__, signature, constexprs, options],
                             sort_keys=True))

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", record)
    from bench.cases import build, suite

    with normkernels.backend("triton"):
        for case in suite("cuda", [torch.float32, torch.bfloat16, torch.float16]):
            build(case, NF, "cpu")()
        for dtype in (torch.float32, torch.float64):  # small and looping rows, fp64
            for n in (100, 16384 + 35):
                x = torch.randn(3, n, dtype=dtype, requires_grad=True)
                w = torch.ones(n, dtype=dtype, requires_grad=True)
                NF.layer_norm(x, (n,), w, w).sum().backward()
                NF.rms_norm(x, (n,), w).sum().backward()
            x = torch.randn(2, 8, 5, 5, dtype=dtype, requires_grad=True)
            w = torch.ones(8, dtype=dtype, requires_grad=True)
            NF.group_norm(x, 4, w, w).sum().backward()
            NF.batch_norm(x, None, None, w, w, training=True).sum().backward()
            NF.batch_norm(x, torch.zeros(8, dtype=dtype), torch.ones(8, dtype=dtype), w, w).sum().backward()
    return sorted(specs)


_COMPILE = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 4):
    sys.exit(3)  # Triton before 3.4: another ASTSource (3.3 keys constexprs by index) and ptxas
try:  # the ptxas Triton itself assembles with (Triton 3.9's bundled plain ptxas is too old
    from triton.backends.nvidia.compiler import get_ptxas  # for the PTX it writes)
    ptxas = get_ptxas(90).path
except (ImportError, TypeError):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
dtypes = {"fp32": tl.float32, "fp64": tl.float64}
report = []
for spec in json.load(sys.stdin):
    module, name, signature, constexprs, options = json.loads(spec)
    fn = getattr(importlib.import_module(module), name)
    constexprs = {k: dtypes.get(v, v) if isinstance(v, str) else v for k, v in constexprs.items()}
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:
        report.append([spec, "error: " + str(e)[-2000:], 0])
        continue
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    if not re.search(r"Used \d+ registers", out):
        report.append([spec, "ptxas: " + out[-2000:], 0])
        continue
    report.append([spec, "ok", sum(int(b) for b in re.findall(r"(\d+) bytes spill stores", out))])
json.dump(report, sys.stdout)
"""


def test_every_launch_compiles_for_sm90_without_spills(monkeypatch):
    specs = _record_launches(monkeypatch)
    assert len(specs) > 50  # every kernel, in many specializations
    kernels = {json.loads(s)[1] for s in specs}
    assert {"layer_norm_fwd_kernel", "layer_norm_bwd_kernel", "group_moments_partial_kernel",
            "batch_moments_partial_kernel", "norm_affine_kernel", "group_grad_coeffs_kernel",
            "batch_grad_coeffs_kernel", "sum_rows_kernel"} <= kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # (Triton 3.9 warns while it is unset)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(specs), env=env,
                          cwd=root, capture_output=True, text=True, timeout=900)
    if "backends.compiler" in done.stderr and "No module" in done.stderr:
        pytest.skip("this Triton has no CUDA backend")
    if done.returncode == 3:
        pytest.skip("Triton before 3.4 (its ASTSource takes other arguments)")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert len(report) == len(specs)
    failed = [(json.loads(s)[1:4], status) for s, status, _ in report if status != "ok"]
    assert not failed, failed[:3]
    spilled = [(json.loads(s)[1], json.loads(s)[2], json.loads(s)[3], json.loads(s)[4], spill)
               for s, status, spill in report if spill]
    # Known, not yet fixed (measuring a fix needs a GPU): the layer norm backward at the widest
    # row block (8192) holds x, dy, weight, dx and two partial sums of a row in registers and
    # spills (Triton 3.9, sm_90: 252-256 bytes a thread with 16 warps or 32; Triton 3.6: 344-420
    # with 16, none with 32). Also let pass: fp64 (rare on GPUs; the elementwise kernel spilled
    # 8 bytes there) and a few bytes anywhere (Triton 3.6 spills 12 in channel_grad_sums, 3.9 none).
    # Anything more fails here.
    unexpected = [s for s in spilled
                  if not (s[0] == "layer_norm_bwd_kernel" and s[2]["BLOCK_N"] == 8192)
                  and "*fp64" not in s[1].values() and s[4] > 16]
    assert not unexpected, "\n".join(map(str, unexpected))
