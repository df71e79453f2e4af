"""torch.compile(fullgraph=True) traces forward and backward through our ops with no graph
break, and no ATen norm op ever runs inside our modules."""
import copy
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import normkernels
from samples import OpRecorder, aten_norms


class EveryNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(4, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.bn3 = nn.BatchNorm3d(2)
        self.in1 = nn.InstanceNorm1d(8)
        self.bn1 = nn.BatchNorm1d(64)
        self.ln = nn.LayerNorm(64)
        self.rms = nn.RMSNorm(64)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        h = self.inorm(self.gn(self.bn(self.conv(x))))
        h = self.bn3(h.unflatten(1, (2, 4))).flatten(1, 2)
        h = self.in1(h.flatten(2))
        h = h.flatten(1)[:, :64]
        return self.head(self.rms(self.ln(self.bn1(h))))


def _pair():
    torch.manual_seed(0)
    model = EveryNorm()
    return model, normkernels.convert(copy.deepcopy(model))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    ref, ours = _pair()
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    x = torch.randn(4, 3, 8, 8)
    for step in range(2):  # also the running statistics, through two steps
        y_ref, y = ref(x), compiled(x)
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
        y.square().sum().backward()
        y_ref.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)
    for (name, b), c in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5, msg=name)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(compiled(x), ref(x), atol=1e-4, rtol=1e-4)


def test_inductor_runs_our_ops_not_their_decompositions():
    """Our ops have decompositions registered (for exporters, normkernels/_decompositions.py);
    inductor's code must still call the ops, forward and backward, in training and eval."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    _, ours = _pair()
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(ours, fullgraph=True, backend="inductor")
    _, code = run_and_get_code(lambda: compiled(x).sum().backward())
    called = set(re.findall(r"normkernels\.(\w+)", "\n".join(code)))
    assert called == {"layer_norm_fwd", "layer_norm_bwd", "group_norm_fwd", "group_norm_bwd",
                      "batch_norm_fwd", "batch_norm_bwd"}, called
    ours.eval()
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="inductor")
    _, code = run_and_get_code(lambda: compiled(x))
    called = set(re.findall(r"normkernels\.(\w+)", "\n".join(code)))
    assert called == {"layer_norm_fwd", "group_norm_fwd", "batch_norm_infer"}, called


_DYNAMIC_CASES = {
    "LayerNorm": (lambda nn: nn.LayerNorm(16), lambda n: torch.randn(n, n + 3, 16)),
    "RMSNorm": (lambda nn: nn.RMSNorm(16), lambda n: torch.randn(n, n + 1, 16)),
    "GroupNorm": (lambda nn: nn.GroupNorm(4, 8), lambda n: torch.randn(n, 8, n + 2, 3)),
    "InstanceNorm2d": (lambda nn: nn.InstanceNorm2d(8, affine=True), lambda n: torch.randn(n, 8, n + 2, 2)),
    "BatchNorm2d": (lambda nn: nn.BatchNorm2d(8), lambda n: torch.randn(n, 8, n + 1, 3)),
    "BatchNorm2d-eval": (lambda nn: nn.BatchNorm2d(8).eval(), lambda n: torch.randn(n, 8, n + 1, 3)),
}


@pytest.mark.parametrize("name", list(_DYNAMIC_CASES))
def test_compile_dynamic_shapes(name):
    # torch.compile(dynamic=True): our fake kernels take symbolic sizes, so inputs of new sizes
    # reuse the graph (no more graphs than torch's own module takes), with torch's results
    from torch._dynamo.utils import counters

    make_module, make_input = _DYNAMIC_CASES[name]

    def run(module):
        """y, dx and the module's buffers at three sizes through one compiled module, and the
        graphs dynamo made"""
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(1)
        compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
        outs = []
        for n in (2, 3, 5):
            x = make_input(n).requires_grad_()
            y = compiled(x)
            y.square().sum().backward()
            outs.append([y, x.grad] + [b.clone() for b in module.buffers()])
        return outs, counters["stats"]["unique_graphs"]

    torch.manual_seed(0)
    ref = make_module(nn)
    ours = normkernels.convert(copy.deepcopy(ref))
    ref_outs, ref_graphs = run(ref)
    outs, graphs = run(ours)
    for got, expected in zip(outs, ref_outs):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert graphs <= ref_graphs, (graphs, ref_graphs)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)


def test_no_graph_break():
    torch._dynamo.reset()
    _, ours = _pair()
    explanation = torch._dynamo.explain(ours)(torch.randn(2, 3, 8, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_cuda_checks_trace_without_graph_break(monkeypatch):
    """Every functional call on a CUDA tensor asks whether Triton is installed
    (backend.check_runnable); under torch.compile(fullgraph=True) that question must trace. With
    torch 2.11 it did not on an H200: its dynamo refuses to trace importlib.util.find_spec, so
    compiling any model of ours raised (torch 2.13's traces it). Hence the answer is looked up
    once, at import, never per call; here, with no GPU, the question alone."""
    import importlib.util

    from normkernels.backend import triton_installed

    with monkeypatch.context() as patch:  # (torch.compile itself calls find_spec)
        patch.setattr(importlib.util, "find_spec",
                      lambda *a, **k: pytest.fail("importlib.util.find_spec called per call"))
        triton_installed()
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x + 1 if triton_installed() else x - 1, fullgraph=True, backend="eager")
    expected = 1.0 if triton_installed() else -1.0
    torch.testing.assert_close(fn(torch.zeros(2)), torch.full((2,), expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_no_aten_norm_op_runs(dtype, channels_last):
    _, ours = _pair()
    ours = ours.to(dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    recorder = OpRecorder()
    with recorder:
        for train in (True, False):
            ours.train(train)
            ours(x.requires_grad_()).sum().backward()
    assert not recorder.aten_norms(), recorder.aten_norms()
    ours_ran = {n.split(".")[1] for n in recorder.names if n.startswith("normkernels.")}
    assert ours_ran == {
        "layer_norm_fwd", "layer_norm_bwd", "group_norm_fwd", "group_norm_bwd",
        "batch_norm_fwd", "batch_norm_infer", "batch_norm_bwd",
    }


@pytest.mark.parametrize("training", [False, True])
def test_torch_export(training):
    # torch.export (serving): the exported graph holds our ops and no ATen norm op, takes a
    # dynamic batch, survives save/load, and in training updates the running statistics as
    # torch's module does
    import io

    ref, ours = _pair()
    ref.train(training)
    ours.train(training)
    x = torch.randn(4, 3, 8, 8)
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(ours, (x,), dynamic_shapes={"x": {0: batch}})
    called = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert any(c.startswith("normkernels.") for c in called), called
    assert not aten_norms(called), called
    # torch.export's own lowering keeps our ops (their decompositions are for exporters to
    # other runtimes, normkernels/_decompositions.py)
    lowered = program.run_decompositions()
    assert {str(node.target) for node in lowered.graph.nodes if node.op == "call_function"
            and str(node.target).startswith("normkernels.")} == {
        c for c in called if c.startswith("normkernels.")}
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    exported = torch.export.load(buffer).module()
    for n in (4, 7):
        x = torch.randn(n, 3, 8, 8)
        torch.testing.assert_close(exported(x), ref(x), atol=1e-4, rtol=1e-4)
    if training:  # (in inference torch 2.6's export drops the unused num_batches_tracked)
        buffers = dict(exported.named_buffers())
        for name, b in ref.named_buffers():
            torch.testing.assert_close(buffers[name], b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def eval_pair():
    """torch's every-norm model and its converted copy, in eval."""
    ref, ours = _pair()
    return ref.eval(), ours.eval()


@pytest.fixture(scope="module")
def aoti_package(eval_pair, tmp_path_factory):
    """The converted model exported with a dynamic batch and compiled into an AOTInductor
    package; with torch's model to compare against."""
    ref, ours = eval_pair
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(ours, (torch.randn(4, 3, 8, 8),), dynamic_shapes=({0: batch},))
    path = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path_factory.mktemp("aoti") / "model.pt2"))
    return ref, path


def test_aot_inductor_package_runs_our_ops(aoti_package):
    # AOTInductor (serving without Python's tracing): the package loaded back and run at two
    # batch sizes; the compiled model calls our ops (through the dispatcher, so `import
    # normkernels` must precede loading it), not their decompositions or ATen's norm ops
    ref, path = aoti_package
    runner = torch._inductor.aoti_load_package(path)
    for n in (4, 7):
        x = torch.randn(n, 3, 8, 8)
        with OpRecorder() as recorder:
            y = runner(x)
        torch.testing.assert_close(y, ref(x), atol=1e-4, rtol=1e-4)
        assert recorder.ours() > 0, recorder.names
        assert not recorder.aten_norms()


@pytest.fixture(scope="module")
def cpp_runner(tmp_path_factory):
    """tests/cpp/runner.cpp built against the installed torch: a process without Python that
    runs an AOTInductor package or a TorchScript file."""
    import shutil
    import subprocess

    from torch.utils import cpp_extension

    if not sys.platform.startswith("linux"):
        pytest.skip("the runner is built for Linux")
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    torch_lib = cpp_extension.library_paths()[0]
    runner = tmp_path_factory.mktemp("runner") / "runner"
    build = subprocess.run(
        [compiler, "-std=c++20", "-O0",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
         *[f"-I{p}" for p in cpp_extension.include_paths()],
         str(Path(__file__).parent / "cpp" / "runner.cpp"), "-o", str(runner),
         f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch", "-ldl"],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    return runner, torch_lib


@pytest.mark.parametrize("kind", ["aot_inductor", "torchscript"])
def test_exported_model_runs_without_python(kind, cpp_runner, eval_pair, request, tmp_path):
    """A converted model served by a C++ process without Python (tests/cpp/runner.cpp): with
    normkernels' ops library loaded it matches torch's model; without it the model cannot find
    our ops, so what ran was ours. The process has no Python symbols, and dlopen resolves all of
    the library's at once (RTLD_NOW), so the library needs no libpython or libtorch_python."""
    import subprocess

    runner, torch_lib = cpp_runner
    ref, ours = eval_pair
    if kind == "aot_inductor":
        model = request.getfixturevalue("aoti_package")[1]
    else:
        model = str(tmp_path / "model.ts")
        torch.jit.save(torch.jit.script(ours), model)
    x = torch.randn(5, 3, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    # no Python variables; libtorch found as a deployment finds it (torch 2.6's compiled package
    # needs libtorch.so, which the runner's own run path does not give the libraries it dlopens)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [torch_lib,
                                                           env.get("LD_LIBRARY_PATH")]))
    env["TMPDIR"] = str(tmp_path)  # where the loader unpacks a package (it leaves it there)

    def run(ops_library):
        return subprocess.run([str(runner), ops_library, model, str(tmp_path / "x.pt"),
                               str(tmp_path / "y.pt")], env=env, capture_output=True, text=True,
                              timeout=600)

    with_ops = run(normkernels.ops_library_path())
    assert with_ops.returncode == 0, with_ops.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), ref(x), atol=1e-4, rtol=1e-4)
    without = run("-")
    assert without.returncode != 0 and "normkernels::" in without.stderr, without.stderr[-3000:]


_COMPILE_UNDER_CI = """
import copy

import torch
{first}
import normkernels
from torch import nn

torch.manual_seed(0)
ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.Flatten(2),
                    nn.LayerNorm(36))
ours = normkernels.convert(copy.deepcopy(ref))
compiled = torch.compile(ours, fullgraph=True, backend="inductor")
x = torch.randn(2, 3, 8, 8)
with torch.no_grad():
    for train in (True, False):  # batch_norm_fwd, then batch_norm_infer
        ref.train(train)
        ours.train(train)
        torch.testing.assert_close(compiled(x), ref(x), atol=1e-4, rtol=1e-4)
from torch._inductor.lowering import lowerings
assert all(op in lowerings for op in (torch.ops.normkernels.layer_norm_fwd.default,
                                      torch.ops.normkernels.group_norm_fwd.default,
                                      torch.ops.normkernels.batch_norm_fwd.default,
                                      torch.ops.normkernels.batch_norm_infer.default))
print("compiled")
"""


@pytest.mark.parametrize("inductor_first", [False, True], ids=["inductor-after", "inductor-first"])
def test_inductor_keeps_our_ops_where_ci_is_set(tmp_path, inductor_first):
    """Where the environment sets CI (CI services do), inductor refuses to call an op that has a
    decomposition (ours have, for exporters) unless the op is registered as a fallback;
    normkernels registers its ops when inductor's lowering module loads (or at import, if it
    has). A fresh process and a fresh inductor cache: a cached graph skips lowering."""
    import subprocess

    code = _COMPILE_UNDER_CI.format(first="import torch._inductor.lowering" if inductor_first else "")
    env = dict(os.environ, CI="1", TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
