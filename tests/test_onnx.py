"""ONNX export of converted models: every norm module, exported by plain torch.onnx.export (the
torch.export-based exporter, which decomposes our ops by their registered decompositions) and by
the legacy TorchScript-based one (dynamo=False: our ops' registered symbolics), run by ONNX
Runtime, against torch's module on the same input; the exported graph holds standard ONNX
operators only."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import normkernels
from samples import randomize_

onnxscript = pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

# (name, module, input shape): each torch.nn norm module our ops translate for
MODULES = [
    ("LayerNorm", lambda: nn.LayerNorm(16), (3, 16)),
    ("LayerNorm-2d-nobias", lambda: nn.LayerNorm((4, 6), bias=False), (2, 3, 4, 6)),
    ("LayerNorm-noaffine", lambda: nn.LayerNorm(16, elementwise_affine=False), (3, 16)),
    ("RMSNorm", lambda: nn.RMSNorm(16), (3, 16)),
    ("GroupNorm", lambda: nn.GroupNorm(4, 8), (3, 8, 5, 4)),
    ("GroupNorm-3d-noaffine", lambda: nn.GroupNorm(2, 6, affine=False), (2, 6, 7)),
    ("BatchNorm1d", lambda: nn.BatchNorm1d(8), (5, 8)),
    ("BatchNorm2d", lambda: nn.BatchNorm2d(8), (3, 8, 5, 4)),
    ("BatchNorm3d", lambda: nn.BatchNorm3d(4), (2, 4, 3, 3, 2)),
    ("InstanceNorm2d", lambda: nn.InstanceNorm2d(8, affine=True), (3, 8, 5, 4)),
    ("InstanceNorm2d-running", lambda: nn.InstanceNorm2d(8, track_running_stats=True),
     (3, 8, 5, 4)),
]
DTYPES = [torch.float32, torch.float16]


def _export(model, x, exporter=torch.onnx.export, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own chatter (training mode, deprecations)
        program = exporter(model, (x,), dynamo=True, verbose=False, **kwargs)
    buf = io.BytesIO()
    program.save(buf)
    return program, buf.getvalue()


def _run(onnx_bytes, x):
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _check_export_matches_torch(make, shape, mode, dtype, export):
    """Converts make()'s module (randomized, in mode, in dtype), exports it by export(model, x)
    -> (the file's bytes, its ONNX graph), and runs the file in ONNX Runtime against torch's
    module on the same input; the graph must hold standard ONNX operators only."""
    base = make().apply(randomize_).train(mode == "train")
    torch_m = copy.deepcopy(base).to(dtype)
    ours = normkernels.convert(copy.deepcopy(base).to(dtype))
    x = torch.randn(shape).to(dtype)
    onnx_bytes, graph = export(ours, x)
    domains = {node.domain for node in graph.node}
    assert domains <= {""}, f"non-standard ONNX domains in the graph: {domains}"
    got = _run(onnx_bytes, x)
    expected = torch_m(x).detach()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    # the graph computes as the export of torch's module does (ONNX's normalization operators)
    # or, for RMSNorm and training batch norm, in fp32 rounded once: fp16 within its rounding
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name,make,shape", MODULES, ids=[m[0] for m in MODULES])
def test_exported_model_matches_torch(name, make, shape, mode, dtype):
    def export(model, x):
        program, onnx_bytes = _export(model, x)
        return onnx_bytes, program.model_proto.graph

    _check_export_matches_torch(make, shape, mode, dtype, export)


def _norm_ops(program):
    """The graph's normalization operators, and whether it computes statistics itself."""
    types = [node.op_type for node in program.model_proto.graph.node]
    return sorted(t for t in types if t.endswith("Normalization")), "ReduceMean" in types


@pytest.mark.parametrize("name,make,shape", [m for m in MODULES if m[0] != "RMSNorm"],
                         ids=[m[0] for m in MODULES if m[0] != "RMSNorm"])
def test_inference_graph_uses_the_runtimes_norm_operators(name, make, shape):
    """In eval, a converted module exports to the ONNX normalization operators torch's module
    exports to (LayerNormalization, InstanceNormalization, BatchNormalization: what runtimes
    run fused), not to elementary statistics. (The glue around them may differ: torch's
    InstanceNorm2d with running statistics reshapes around BatchNormalization, ours does not;
    torch's affine InstanceNorm2d gives InstanceNormalization its weight, ours multiplies after.
    RMSNorm: torch's exports elementary ops too.)"""
    base = make().apply(randomize_).eval()
    x = torch.randn(shape)
    torch_program, _ = _export(base, x)
    ours_program, _ = _export(normkernels.convert(copy.deepcopy(base)), x)
    assert _norm_ops(ours_program) == _norm_ops(torch_program)


def test_dynamic_batch_exports_once_and_runs_at_any_batch():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GroupNorm(2, 8),
                          nn.InstanceNorm2d(8), nn.Flatten(2), nn.LayerNorm(64), nn.RMSNorm(64))
    model.apply(randomize_).eval()
    ours = normkernels.convert(copy.deepcopy(model))
    batch = torch.export.Dim("batch", min=1, max=64)
    _, onnx_bytes = _export(ours, torch.randn(2, 3, 8, 8), dynamic_shapes=({0: batch},))
    for n in (1, 5, 17):
        x = torch.randn(n, 3, 8, 8)
        torch.testing.assert_close(_run(onnx_bytes, x), model(x).detach(), rtol=1e-5, atol=1e-5)


def test_normkernels_onnx_export_is_torch_onnx_export():
    """normkernels.onnx, from when our ops needed translations of their own: export() still
    exports (dynamo=True unless told otherwise), and translation_table() is empty (deprecated)."""
    model = normkernels.convert(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))).eval()
    x = torch.randn(2, 4)
    _, onnx_bytes = _export(model, x, exporter=normkernels.onnx.export)
    torch.testing.assert_close(_run(onnx_bytes, x), model(x).detach(), rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        normkernels.onnx.export(model, (x,), buf, dynamo=False)
    torch.testing.assert_close(_run(buf.getvalue(), x), model(x).detach(), rtol=1e-5, atol=1e-5)
    with pytest.warns(DeprecationWarning, match="no longer needed"):
        assert normkernels.onnx.translation_table() == {}


# ------------------------------------------------------- the legacy (TorchScript-based) exporter


def _export_legacy(model, x, **kwargs):
    """torch.onnx.export(..., dynamo=False): the file's bytes and its ONNX model."""
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation of this exporter, training-mode notes
        torch.onnx.export(model, (x,), buf, dynamo=False, **kwargs)
    return buf.getvalue(), onnx.load_from_string(buf.getvalue())


def _legacy_norm_ops(proto):
    return sorted(n.op_type for n in proto.graph.node if n.op_type.endswith("Normalization"))


# opsets whose operators differ: ReduceMean's axes an attribute (9), LayerNormalization (17),
# ReduceMean's axes an input (18); None: the exporter's default
LEGACY_OPSETS = [9, 17, 18, None]


@pytest.mark.parametrize("opset", LEGACY_OPSETS, ids=lambda o: f"opset{o or 'default'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name,make,shape", MODULES, ids=[m[0] for m in MODULES])
def test_legacy_exported_model_matches_torch(name, make, shape, mode, dtype, opset):
    """Traced by the legacy exporter (its default: the model in eval mode; train: exported as
    TrainingMode.TRAINING, batch statistics), run by ONNX Runtime, against torch's module."""
    kwargs = {} if opset is None else {"opset_version": opset}
    if mode == "train":
        kwargs["training"] = torch.onnx.TrainingMode.TRAINING

    def export(model, x):
        onnx_bytes, proto = _export_legacy(model, x, **kwargs)
        return onnx_bytes, proto.graph

    _check_export_matches_torch(make, shape, mode, dtype, export)


@pytest.mark.parametrize("name,make,shape", [m for m in MODULES if m[0] != "RMSNorm"],
                         ids=[m[0] for m in MODULES if m[0] != "RMSNorm"])
def test_legacy_inference_graph_uses_the_runtimes_norm_operators(name, make, shape):
    """In eval, the legacy exporter gives a converted module the ONNX normalization operators it
    gives torch's (torch's RMSNorm does not export with it at all: ours, elementary operators)."""
    base = make().apply(randomize_).eval()
    x = torch.randn(shape)
    _, torch_proto = _export_legacy(base, x)
    _, ours_proto = _export_legacy(normkernels.convert(copy.deepcopy(base)), x)
    assert _legacy_norm_ops(ours_proto) == _legacy_norm_ops(torch_proto)


@pytest.mark.filterwarnings("ignore:`torch.jit.")
def test_legacy_export_of_scripted_and_dynamic_batch_models():
    """A model of every norm, traced with a dynamic batch (run at other batches) and scripted
    (torch.jit.script: the scripted functionals' graphs, exported without tracing)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GroupNorm(2, 8),
                          nn.InstanceNorm2d(8), nn.Flatten(2), nn.LayerNorm(64), nn.RMSNorm(64))
    model.apply(randomize_).eval()
    ours = normkernels.convert(copy.deepcopy(model))
    onnx_bytes, proto = _export_legacy(ours, torch.randn(2, 3, 8, 8), input_names=["x"],
                                       dynamic_axes={"x": {0: "batch"}})
    assert _legacy_norm_ops(proto) == ["BatchNormalization", "InstanceNormalization",
                                       "InstanceNormalization", "LayerNormalization"]
    for n in (1, 5, 17):
        x = torch.randn(n, 3, 8, 8)
        torch.testing.assert_close(_run(onnx_bytes, x), model(x).detach(), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 8, 8)
    onnx_bytes, _ = _export_legacy(torch.jit.script(ours), x)
    torch.testing.assert_close(_run(onnx_bytes, x), model(x).detach(), rtol=1e-5, atol=1e-5)
