"""The public API: nn modules as drop-in subclasses, convert(), checkpoints both ways, pickling,
deepcopy, and backend selection."""
import copy
import io
import sys

import pytest
import torch
from torch import nn

import normkernels
from normkernels.nn import TWINS
from samples import ATEN_NORM_OPS, OpRecorder


@pytest.mark.parametrize("torch_cls", list(TWINS), ids=lambda c: c.__name__)
def test_twin_is_a_drop_in_subclass(torch_cls):
    ours_cls = TWINS[torch_cls]
    assert issubclass(ours_cls, torch_cls)
    assert getattr(normkernels.nn, torch_cls.__name__) is ours_cls
    args = (4, 8) if torch_cls is nn.GroupNorm else () if torch_cls.__name__.startswith("Lazy") else (8,)
    a, b = torch_cls(*args), ours_cls(*args)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()]
    assert repr(a) == repr(b)


def _nested():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.Sequential(nn.BatchNorm2d(8), nn.ModuleDict({"gn": nn.GroupNorm(2, 8), "inn": nn.InstanceNorm2d(8)})),
        nn.Flatten(),
        nn.ModuleList([nn.LayerNorm(8 * 4 * 4), nn.RMSNorm(8 * 4 * 4)]),
    )


def _forward(model, x):
    x = model[0](x)
    x = model[1][0](x)
    x = model[1][1]["inn"](model[1][1]["gn"](x))
    x = model[2](x)
    return model[3][1](model[3][0](x))


def test_convert_swaps_in_place_and_keeps_state():
    model = _nested().double().eval()
    params_before = {n: p for n, p in model.named_parameters()}
    buffers_before = {n: b for n, b in model.named_buffers()}
    out = normkernels.convert(model)
    assert out is model
    kinds = {type(m) for m in model.modules()}
    assert not kinds & set(TWINS), "a torch.nn norm module was left unconverted"
    for n, p in model.named_parameters():
        assert p is params_before[n] and p.dtype == torch.float64
    for n, b in model.named_buffers():
        assert b is buffers_before[n]
    assert not any(m.training for m in model.modules())
    assert isinstance(model[1][0], nn.BatchNorm2d)


def test_revert_gives_torchs_modules_back():
    """revert undoes convert in place, state kept (the very same tensors), so tools that match
    torch's classes by exact type work again: torch.ao's fuse_modules refuses ours."""
    torch.manual_seed(0)
    model = normkernels.convert(_nested())
    x = torch.randn(2, 3, 6, 6)
    _forward(model, x)
    tensors = {n: t for n, t in model.state_dict(keep_vars=True).items()}
    assert normkernels.revert(model) is model
    assert {type(m) for m in model.modules()} & set(TWINS)
    assert not [m for m in model.modules() if type(m).__module__ == "normkernels.nn"]
    assert all(t is tensors[n] for n, t in model.state_dict(keep_vars=True).items())
    lazy = normkernels.revert(normkernels.convert(nn.LazyBatchNorm2d()))
    assert type(lazy) is nn.LazyBatchNorm2d
    conv_bn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with pytest.raises(AssertionError, match="did not find fuser method"):
        torch.ao.quantization.fuse_modules(normkernels.convert(copy.deepcopy(conv_bn)), [["0", "1", "2"]])
    fused = torch.ao.quantization.fuse_modules(normkernels.revert(normkernels.convert(conv_bn)), [["0", "1", "2"]])
    torch.testing.assert_close(fused(x), conv_bn(x))


def test_conv_batch_norm_folding_with_ours():
    """torch.nn.utils.fusion folds our BatchNorm into a conv; fx's fuse matches torch's classes
    by exact type and leaves ours unfolded (right, not folded): fold first, then convert."""
    from torch.fx.experimental.optimization import fuse
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    torch.manual_seed(0)
    conv_bn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with torch.no_grad():
        conv_bn[1].running_mean.uniform_(-1, 1)
        conv_bn[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    ours = normkernels.convert(copy.deepcopy(conv_bn))
    folded = fuse_conv_bn_eval(ours[0], ours[1])
    torch.testing.assert_close(folded(x), conv_bn[1](conv_bn[0](x)))
    unfolded = fuse(ours)
    assert any(isinstance(m, normkernels.nn.BatchNorm2d) for m in unfolded.modules())
    torch.testing.assert_close(unfolded(x), conv_bn(x))
    folded_model = normkernels.convert(fuse(copy.deepcopy(conv_bn)))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded_model.modules())
    torch.testing.assert_close(folded_model(x), conv_bn(x))


def test_transformer_encoder_fast_path_as_torch():
    """nn.TransformerEncoderLayer's inference fast path (eval, no grad) is one native op that
    computes both layer norms itself, never calling the norm modules: converted, the layers take
    it as torch's do (same op, same outputs; it was 15% faster than the layer's module-by-module
    path with our norms in it, BERT-base sizes). Training, grad and
    torch.backends.mha.set_fastpath_enabled(False) run the modules: our kernels then."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    plain = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32), enable_nested_tensor=False)
    plain.eval()
    ours = normkernels.convert(copy.deepcopy(plain))
    x = torch.randn(2, 5, 32)

    def run(model):
        with OpRecorder() as rec:
            y = model(x)
        return y, rec

    with torch.no_grad():
        (want, theirs), (got, rec) = run(plain), run(ours)
        fused = "aten._transformer_encoder_layer_fwd.default"
        assert theirs.names.count(fused) == rec.names.count(fused) == 2
        assert rec.ours() == 1  # the encoder's final norm, outside the layers
        torch.testing.assert_close(got, want)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            (want, _), (got, rec) = run(plain), run(ours)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        assert rec.ours() == 5 and not rec.aten_norms()
        torch.testing.assert_close(got, want)
    (want, _), (got, rec) = run(plain.train()), run(ours.train())  # (no dropout: same outputs)
    assert rec.ours() == 5 and not rec.aten_norms()
    torch.testing.assert_close(got, want)


def test_convert_leaves_user_subclasses_alone():
    class MyLN(nn.LayerNorm):
        pass

    model = nn.Sequential(MyLN(4), nn.LayerNorm(4))
    normkernels.convert(model)
    assert type(model[0]) is MyLN and type(model[1]) is normkernels.nn.LayerNorm
    assert type(normkernels.convert(nn.BatchNorm1d(3))) is normkernels.nn.BatchNorm1d


@pytest.mark.parametrize("lazy_cls,shape", [
    (nn.LazyBatchNorm1d, (4, 6, 5)), (nn.LazyBatchNorm2d, (3, 6, 4, 5)), (nn.LazyBatchNorm3d, (2, 6, 3, 3, 4)),
    (nn.LazyInstanceNorm1d, (3, 6, 7)), (nn.LazyInstanceNorm2d, (3, 6, 4, 5)), (nn.LazyInstanceNorm3d, (2, 6, 3, 3, 4)),
], ids=lambda v: getattr(v, "__name__", ""))
def test_lazy_modules_convert_and_become_our_twins(lazy_cls, shape):
    """A converted lazy module computes with our kernels from its first call (the one that infers
    num_features) and then becomes our twin of torch's cls_to_become, state as torch's."""
    kwargs = {"affine": True, "track_running_stats": True} if "Instance" in lazy_cls.__name__ else {}
    theirs = lazy_cls(**kwargs)
    ours = normkernels.convert(lazy_cls(**kwargs))
    assert type(ours) is TWINS[lazy_cls]
    for mode in ("train", "eval"):
        theirs.train(mode == "train"), ours.train(mode == "train")
        x = torch.randn(shape)
        with OpRecorder() as recorder:
            y = ours(x)
        assert any(n.startswith("normkernels.") for n in recorder.names)
        assert not recorder.aten_norms()
        torch.testing.assert_close(y, theirs(x))
        assert type(ours) is TWINS[type(theirs)] and type(ours).__module__ == "normkernels.nn"
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            torch.testing.assert_close(a, b, msg=f"{name} ({mode})")


def test_convert_sync_batchnorm_gives_ours():
    """normkernels.nn.SyncBatchNorm.convert_sync_batchnorm gives our SyncBatchNorm (torch's
    builds torch's by name); after torch's own, normkernels.convert swaps its result for ours."""
    torch.manual_seed(0)
    plain = _nested()
    x = torch.randn(2, 3, 6, 6)
    _forward(plain, x)  # non-trivial running statistics
    plain.eval()
    want = _forward(plain, x)
    ours = normkernels.nn.SyncBatchNorm.convert_sync_batchnorm(normkernels.convert(copy.deepcopy(plain)))
    theirs = normkernels.convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)))
    for model in (ours, theirs):
        batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert [type(m) for m in batch_norms] == [normkernels.nn.SyncBatchNorm]
        assert not model.training
        torch.testing.assert_close(_forward(model, x), want, atol=1e-5, rtol=1e-5)


class _Traceable(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return _forward(self.model, x)


@pytest.mark.filterwarnings("ignore:`torch.jit.", "ignore::torch.jit.TracerWarning")
def test_traced_model_records_our_ops():
    """torch.jit.trace of a converted model (train and eval) records our ops, no ATen norm op,
    and the traced module computes what torch's model computes, running statistics included."""
    torch.manual_seed(0)
    plain = _nested()
    model = normkernels.convert(copy.deepcopy(plain))
    for training in (True, False):
        plain.train(training), model.train(training)
        x, x2 = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
        traced = torch.jit.trace(_Traceable(model), x, check_trace=False)  # runs it on x once
        _forward(plain, x)
        graph = str(traced.inlined_graph)
        assert "normkernels::" in graph
        assert not [op for op in ATEN_NORM_OPS if f"aten::{op}(" in graph], graph
        torch.testing.assert_close(traced(x2), _forward(plain, x2), atol=1e-5, rtol=1e-5)
        for (name, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
            torch.testing.assert_close(a, b, msg=name)


class _WithSync(_Traceable):
    def __init__(self):
        super().__init__(_nested())
        self.sync = nn.SyncBatchNorm(4)

    def forward(self, x):
        return self.sync(_forward(self.model, x).view(-1, 4, 8, 4))


def test_fx_symbolic_trace_keeps_our_modules_as_leaves():
    """torch.fx.symbolic_trace of a converted model gives torch's graph (each norm module one
    call_module node: FX keeps torch.nn's modules as leaves, and ours say they are one when
    traced), and the GraphModule runs our kernels with torch's results, train and eval."""
    torch.manual_seed(0)
    plain = _WithSync()
    ours = normkernels.convert(copy.deepcopy(plain))
    seen = []
    for model in (plain, ours):  # hooks that need real tensors: a leaf's run only when it runs
        for m in model.modules():
            if isinstance(m, tuple(TWINS)):
                m.register_forward_hook(lambda mod, inp, out: seen.append(float(out.abs().mean())))
    graphs = [torch.fx.symbolic_trace(m) for m in (plain, ours)]
    assert not seen
    nodes = [[(n.op, str(n.target)) for n in g.graph.nodes] for g in graphs]
    assert nodes[0] == nodes[1]
    assert sum(op == "call_module" for op, _ in nodes[1]) == 8  # conv, flatten and six norms
    for training in (True, False):
        for g in graphs:
            g.train(training)
        x = torch.randn(2, 3, 6, 6)
        with OpRecorder() as recorder:
            y = graphs[1](x)
        assert not recorder.aten_norms()
        torch.testing.assert_close(y, graphs[0](x), atol=1e-5, rtol=1e-5)
        assert len(seen) == (12 if training else 24)  # six norms each, ours then torch's
        torch.testing.assert_close(seen[-12:-6], seen[-6:], atol=1e-5, rtol=1e-5)
        for (name, a), (_, b) in zip(graphs[1].state_dict().items(), graphs[0].state_dict().items()):
            torch.testing.assert_close(a, b, msg=name)


def test_checkpoints_load_both_ways_and_outputs_match():
    torch.manual_seed(0)
    plain = _nested()
    x = torch.randn(2, 3, 6, 6)
    _forward(plain, x)  # one training step moves the running statistics
    converted = normkernels.convert(_nested())
    converted.load_state_dict(plain.state_dict())
    back = _nested()
    back.load_state_dict(converted.state_dict())
    for m in (plain, converted, back):
        m.eval()
    torch.testing.assert_close(_forward(converted, x), _forward(plain, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_forward(back, x), _forward(plain, x))


def test_pickle_and_deepcopy():
    model = normkernels.convert(_nested())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    model.eval(), loaded.eval(), clone.eval()
    assert type(loaded[1][0]) is normkernels.nn.BatchNorm2d
    torch.testing.assert_close(_forward(loaded, x), _forward(model, x))
    torch.testing.assert_close(_forward(clone, x), _forward(model, x))


# One module of each family, for the inference-mode tests: (factory, input shape)
_FAMILIES = {
    "BatchNorm2d": (lambda: nn.BatchNorm2d(8), (4, 8, 5, 5)),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(8), (4, 8)),
    "GroupNorm": (lambda: nn.GroupNorm(2, 8), (4, 8, 5, 5)),
    "InstanceNorm2d": (lambda: nn.InstanceNorm2d(8, affine=True, track_running_stats=True), (4, 8, 5, 5)),
    "LayerNorm": (lambda: nn.LayerNorm(5), (4, 8, 5)),
    "RMSNorm": (lambda: nn.RMSNorm(5), (4, 8, 5)),
}


@pytest.mark.parametrize("family", list(_FAMILIES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_modules_under_inference_mode_match_torch(family, training):
    # serving code runs models under torch.inference_mode: outputs are inference tensors, and a
    # training-mode BatchNorm still updates its running statistics (in place, as torch's does)
    make, shape = _FAMILIES[family]
    torch.manual_seed(0)
    theirs = make().train(training)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
    ours = normkernels.convert(copy.deepcopy(theirs))
    x = torch.randn(shape)
    with torch.inference_mode():
        y_theirs, y_ours = theirs(x), ours(x)
    assert y_ours.is_inference()
    torch.testing.assert_close(y_ours, y_theirs)
    for (name, b_theirs), (_, b_ours) in zip(theirs.named_buffers(), ours.named_buffers()):
        torch.testing.assert_close(b_ours, b_theirs, msg=name)


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_inference_tensor_input_to_a_trained_module_as_torch(family):
    # features made under inference_mode (a frozen backbone) fed to a module being trained:
    # torch's rms_norm saves no input that needs no gradient, so its weight trains; the other
    # norms save x and raise. Ours does the same in each case.
    make, shape = _FAMILIES[family]
    theirs = make()
    ours = normkernels.convert(copy.deepcopy(theirs))
    with torch.inference_mode():
        x = torch.randn(shape)
    results = []
    for m in (theirs, ours):
        try:
            m(x).square().sum().backward()
            results.append([p.grad for p in m.parameters()])
        except RuntimeError as e:
            assert "Inference tensors cannot be saved for backward" in str(e)
            results.append(None)
    if results[0] is None:
        assert results[1] is None
    else:
        assert results[1] is not None and len(results[1]) == len(results[0]) > 0
        for g_ours, g_theirs in zip(results[1], results[0]):
            torch.testing.assert_close(g_ours, g_theirs)


def test_meta_device_model_converts_infers_shapes_and_materializes():
    # large models are built on the meta device, converted, then materialized and loaded
    torch.manual_seed(0)
    theirs = _nested()
    with torch.device("meta"):
        ours = normkernels.convert(_nested())
    assert type(ours[1][0]) is normkernels.nn.BatchNorm2d and ours[1][0].weight.is_meta
    x_meta = torch.empty(2, 3, 6, 6, device="meta", requires_grad=True)
    y_meta = _forward(ours, x_meta)
    assert y_meta.is_meta and y_meta.shape == (2, 8 * 4 * 4)
    grads = torch.autograd.grad(y_meta.sum(), [x_meta, *ours.parameters()])
    assert all(g.is_meta and g.shape == p.shape for g, p in zip(grads, [x_meta, *ours.parameters()]))
    ours.to_empty(device="cpu")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(_forward(ours, x), _forward(theirs, x))
    for (name, b_ours), b_theirs in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(b_ours, b_theirs, msg=name)


def test_activation_checkpointing_matches_torch():
    # torch.utils.checkpoint reruns the forward during backward (a training-mode BatchNorm
    # updates its running statistics twice, in torch's modules as in ours)
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    theirs = _nested()
    ours = normkernels.convert(copy.deepcopy(theirs))
    x = torch.randn(2, 3, 6, 6)
    results = []
    for model in (theirs, ours):
        xg = x.clone().requires_grad_()
        y = checkpoint(_forward, model, xg, use_reentrant=False)
        y.square().sum().backward()
        results.append((y.detach(), xg.grad, [p.grad for p in model.parameters()],
                        list(model.buffers())))
    (y_t, dx_t, dp_t, b_t), (y_o, dx_o, dp_o, b_o) = results
    torch.testing.assert_close(y_o, y_t)
    torch.testing.assert_close(dx_o, dx_t, atol=1e-4, rtol=1e-4)
    for g_o, g_t in zip(dp_o, dp_t):
        torch.testing.assert_close(g_o, g_t, atol=1e-4, rtol=1e-4)
    for b_ours, b_theirs in zip(b_o, b_t):
        torch.testing.assert_close(b_ours, b_theirs)
    assert int(ours[1][0].num_batches_tracked) == 2


def test_python_threads_running_models_at_once_get_the_serial_results():
    # servers run requests on threads: our ops share the output pool and ATen's thread pool;
    # results must not depend on what runs beside them (bit-identical to one call at a time).
    # Norms alone: torch's own conv2d is not bit-stable so on every machine (bf16 on aarch64).
    from concurrent.futures import ThreadPoolExecutor
    torch.manual_seed(0)
    base = normkernels.convert(nn.Sequential(
        nn.BatchNorm2d(16), nn.GroupNorm(4, 16), nn.InstanceNorm2d(16, affine=True), nn.Flatten(),
        nn.LayerNorm(16 * 16 * 16), nn.RMSNorm(16 * 16 * 16)))
    with torch.no_grad():
        for p in base.parameters():
            p.uniform_(0.5, 1.5)
    xs = [torch.randn(4, 16, 16, 16) for _ in range(6)]

    def train_step(i, model):
        x = xs[i].clone().requires_grad_()
        y = model(x)
        y.square().mean().backward()
        return [y.detach(), x.grad, *(p.grad for p in model.parameters()), *model.buffers()]

    serial = [train_step(i, copy.deepcopy(base)) for i in range(len(xs))]
    for _ in range(3):
        models = [copy.deepcopy(base) for _ in xs]
        with ThreadPoolExecutor(len(xs)) as pool:
            threaded = list(pool.map(lambda i: train_step(i, models[i]), range(len(xs))))
        for one, other in zip(serial, threaded):
            assert all(torch.equal(a, b) for a, b in zip(one, other))
    shared = copy.deepcopy(base).eval().to(torch.bfloat16)  # one model, many requests
    requests = [torch.randn(2, 16, 16, 16, dtype=torch.bfloat16) for _ in range(12)]
    with torch.inference_mode():
        serial = [shared(x) for x in requests]
        for _ in range(3):
            with ThreadPoolExecutor(len(requests)) as pool:
                threaded = list(pool.map(shared, requests))
            assert all(torch.equal(a, b) for a, b in zip(serial, threaded))


def test_backend_selection():
    x = torch.randn(3, 8)
    with normkernels.backend("cpp"):
        torch.testing.assert_close(normkernels.functional.layer_norm(x, (8,)), torch.nn.functional.layer_norm(x, (8,)))
    with normkernels.backend("auto"):
        normkernels.functional.layer_norm(x, (8,))
    with pytest.raises(ValueError):
        with normkernels.backend("cuda"):
            pass
    assert normkernels.backend.__module__ == "normkernels.backend"


def test_unavailable_triton_backend_raises_clearly():
    """Without a GPU and without the interpreter, asking for Triton says what to do."""
    import os
    import subprocess
    import sys

    code = (
        "import normkernels\n"
        "try:\n"
        "    with normkernels.backend('triton'): pass\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: Triton is available")
    assert "raised:" in out.stdout and ("TRITON_INTERPRET" in out.stdout or "not installed" in out.stdout), out


def test_devices_without_kernels_raise_before_running():
    from normkernels.backend import check_runnable

    class FakeTensor:
        def __init__(self, kind):
            self.device = type("D", (), {"type": kind})()

    with pytest.raises(NotImplementedError, match="xpu"):
        check_runnable(FakeTensor("xpu"), "layer_norm")
    with normkernels.backend("cpp"):
        with pytest.raises(NotImplementedError, match="cpp"):
            check_runnable(FakeTensor("cuda"), "layer_norm")


def test_cpu_capability_is_reported():
    assert normkernels.cpu_capability() in ("DEFAULT", "AVX2", "AVX512")


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_every_simd_build_matches_torch(capability):
    """Each per-capability build of the kernels (chosen at load) is correct, not just the best."""
    import os
    import subprocess
    import sys

    code = r"""
import torch, normkernels, normkernels.functional as NF, torch.nn.functional as F
from samples import assert_close_like_torch  # tests/ is on PYTHONPATH
expected = {"default": "DEFAULT", "avx2": "AVX2"}[CAP]
have = normkernels.cpu_capability()
assert have == expected or (expected == "AVX2" and have == "DEFAULT"), have
torch.manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    tol = dict(atol=1e-4, rtol=1e-4) if dt == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    x = torch.randn(5, 7, 9, 11).to(dt)
    w = torch.randn(7).to(dt)
    for xi in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(NF.group_norm(xi, 7, w, w).float(), F.group_norm(xi, 7, w, w).float(), **tol)
        torch.testing.assert_close(NF.batch_norm(xi, None, None, w, w, True).float(), F.batch_norm(xi, None, None, w, w, True).float(), **tol)
    torch.testing.assert_close(NF.layer_norm(x, (9, 11)).float(), F.layer_norm(x, (9, 11)).float(), **tol)
    # 7x7 planes take the short-plane batch norm (per-channel merges of 49 positions; under AVX2
    # the forwards in bf16's lane order, and the backward too from 32 samples), and 4 channels
    # per group the group-statistics merge.
    # Batch norm against fp64 by the parity suite's check (torch's own bf16 dx is off by more than
    # the values themselves on some data)
    x7 = torch.randn(6, 8, 7, 7).to(dt)
    w8 = torch.rand(8).to(dt) + 0.5
    rm8, rv8 = torch.randn(8).to(dt), (torch.rand(8) + 0.5).to(dt)
    for xi in (x7, x7.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(NF.group_norm(xi, 2, w8, w8).float(), F.group_norm(xi, 2, w8, w8).float(), **tol)
        stats = [(rm8, rv8, w8, rm8), (rm8.double(), rv8.double(), w8.double(), rm8.double())]
        assert_close_like_torch(NF.batch_norm(xi, *stats[0]), F.batch_norm(xi, *stats[0]),
                                F.batch_norm(xi.double(), *stats[1]), "7x7 inference")
    for xt in (x7, torch.randn(33, 8, 7, 7).to(dt)):
        grads = []
        for fn, cast in ((NF.batch_norm, dt), (F.batch_norm, dt), (F.batch_norm, torch.float64)):
            xg7, wg8 = xt.to(cast).clone().requires_grad_(), w8.to(cast).clone().requires_grad_()
            y7 = fn(xg7, None, None, wg8, wg8, True)
            grads.append((y7, *torch.autograd.grad(y7, (xg7, wg8), (torch.ones_like(xt) + xt).to(cast))))
        for what, ours, theirs, ref in zip(("y", "dx", "dweight"), *grads):
            assert_close_like_torch(ours, theirs, ref, f"7x7 training, {len(xt)} samples, " + what)
    xg = x.float().requires_grad_()
    torch.autograd.grad(NF.layer_norm(xg, (11,)).square().sum(), xg)
print("ok")
""".replace("CAP", repr(capability))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, NORMKERNELS_CPU_CAPABILITY=capability, PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_eager_fast_path_takes_plain_calls_and_declines_the_rest():
    """functional's C fast path runs plain CPU calls and returns None for everything it does not
    check, which the Python path then handles (and explains)."""
    from normkernels import _C

    x = torch.randn(3, 4, 5, 6)
    w, b = torch.randn(4), torch.randn(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    torch.testing.assert_close(_C.layer_norm(x, (5, 6), None, None, 1e-5, False),
                               torch.nn.functional.layer_norm(x, (5, 6)))
    torch.testing.assert_close(_C.layer_norm(x, 6, None, None, 1e-5, True),
                               torch.nn.functional.rms_norm(x, (6,), eps=1e-5))
    torch.testing.assert_close(_C.group_norm(x, 2, w, b, 1e-5),
                               torch.nn.functional.group_norm(x, 2, w, b))
    rm_t, rv_t = rm.clone(), rv.clone()
    torch.testing.assert_close(_C.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5),
                               torch.nn.functional.batch_norm(x, rm_t, rv_t, w, b, True))
    torch.testing.assert_close((rm, rv), (rm_t, rv_t))  # running statistics updated like torch's
    torch.testing.assert_close(_C.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5),
                               torch.nn.functional.batch_norm(x, rm, rv, w, b, False))

    class Sub(torch.Tensor):
        pass

    declined = [
        _C.layer_norm(x, (5, 7), None, None, 1e-5, False),  # shape mismatch
        _C.layer_norm(x, (), None, None, 1e-5, False),
        _C.layer_norm(x.long(), (6,), None, None, 1e-5, False),  # not floating point
        _C.layer_norm(x.as_subclass(Sub), (6,), None, None, 1e-5, False),  # a subclass
        _C.layer_norm(x, (6,), w, None, 1e-5, False),  # weight of the wrong shape
        _C.group_norm(x, 3, None, None, 1e-5),  # 4 channels in 3 groups
        _C.batch_norm(x, None, None, w, b, False, 0.1, 1e-5),  # eval without statistics
        _C.batch_norm(torch.randn(1, 4), None, None, None, None, True, 0.1, 1e-5),  # 1 value
        _C.batch_norm(x, rm[:3], rv, w, b, True, 0.1, 1e-5),
    ]
    assert all(d is None for d in declined)
    # a __torch_function__ mode sees the call: the fast path steps aside for it
    seen = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        assert _C.layer_norm(x, (6,), None, None, 1e-5, False) is None
        y = normkernels.functional.layer_norm(x, (6,))
    assert seen
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (6,)))
    # the declined calls still raise torch's errors through the Python path
    with pytest.raises(RuntimeError):
        normkernels.functional.group_norm(x, 3)
    with pytest.raises(ValueError):
        normkernels.functional.batch_norm(torch.randn(1, 4), None, None, training=True)


def test_large_outputs_reuse_freed_blocks_and_release_on_request():
    """Outputs of 128 KiB or more come from normkernels' CPU pool: a freed one is handed out
    again (no fresh, page-faulting memory each step), resizes like any tensor, and
    empty_cpu_cache gives the idle memory back."""
    import normkernels.functional as NF

    # 2 MiB; 0.8 MB, pooled as 1 MiB (a 16x512x7x7 bf16 batch norm's); 128 KiB, the smallest
    for x in (torch.randn(512, 1024), torch.randn(400, 1024, dtype=torch.bfloat16),
              torch.randn(32, 1024)):
        normkernels.empty_cpu_cache()
        y = NF.layer_norm(x, (1024,))
        ptr = y.data_ptr()
        del y
        assert normkernels.cached_cpu_bytes() >= x.nbytes
        y = NF.layer_norm(x, (1024,))
        assert y.data_ptr() == ptr  # the same block again
        assert normkernels.cached_cpu_bytes() == 0
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (1024,)))
        del y
    x = torch.randn(512, 1024)
    y = NF.layer_norm(x, (1024,))
    # channels_last outputs keep torch's strides
    xc = torch.randn(4, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    yc = NF.group_norm(xc, 8)
    assert yc.stride() == xc.stride()
    torch.testing.assert_close(yc, torch.nn.functional.group_norm(xc, 8))
    # storage from the pool resizes (and keeps its values) like any tensor's
    head = y[:2].clone()
    y.resize_(1024, 1024)
    torch.testing.assert_close(y[:2], head)
    del y, yc
    assert normkernels.empty_cpu_cache() >= x.nbytes
    assert normkernels.cached_cpu_bytes() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts: Linux")
def test_kernel_scratch_reuses_pooled_blocks():
    """The kernels' large scratch arrays (here a GroupNorm backward's per-(n, c) sums, 512 KiB
    each) come from the pool as outputs do: after the first calls, a step touches no fresh
    pages (before, this backward faulted about 480 times a call)."""
    import resource

    x = torch.randn(64, 2048, 1, 1)
    w = torch.rand(2048) + 0.5
    b = torch.randn(2048)
    dy = torch.randn_like(x)
    y, mean, rstd = torch.ops.normkernels.group_norm_fwd(x, 32, w, b, 1e-5)

    def backward():
        return torch.ops.normkernels.group_norm_bwd(dy, x, mean, rstd, w, 32, [True, True, True])

    for _ in range(3):
        backward()
    assert normkernels.cached_cpu_bytes() >= 2 * x.nbytes  # the sums' blocks, idle again
    calls = 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        dx, dw, db = backward()
        del dx, dw, db
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2 * calls, f"{faults} page faults in {calls} backward calls"
    expected = torch.ops.aten.native_group_norm_backward(dy, x, mean, rstd, w, 64, 2048, 1, 32,
                                                         [True, True, True])
    for ours, theirs in zip(backward(), expected):
        torch.testing.assert_close(ours, theirs)


def test_output_pool_can_be_turned_off():
    import os
    import subprocess
    import sys

    code = r"""
import torch, normkernels, normkernels.functional as NF
y = NF.layer_norm(torch.randn(512, 1024), (1024,))
del y
assert normkernels.cached_cpu_bytes() == 0
print("ok")
"""
    env = dict(os.environ, NORMKERNELS_CPU_CACHE_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_output_pool_works_in_a_forked_child():
    """A DataLoader worker is a fork: the pool it inherits (and its lock) must still work."""
    import multiprocessing

    import normkernels.functional as NF

    x = torch.randn(512, 1024)
    y = NF.layer_norm(x, (1024,))
    del y  # an idle block in the pool the child inherits
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_norm_in_child)
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0


def _norm_in_child():
    import normkernels.functional as NF

    # as DataLoader workers do: torch's own OpenMP ops hang in a child forked after a parallel
    # region (libgomp is not fork-safe), with or without normkernels
    torch.set_num_threads(1)
    x = torch.randn(512, 1024)
    for _ in range(3):
        torch.testing.assert_close(NF.layer_norm(x, (1024,)), torch.nn.functional.layer_norm(x, (1024,)))


def test_streaming_stores_match_torch(tmp_path):
    """Outputs of passes that do not fit the last-level cache (forward) or half of it (backward)
    are written with streaming stores. Forced on (NORMKERNELS_STREAM_STORES=1), that path must
    pass the CPU parity suite (every family, dtype and layout, misaligned rows falling back to
    plain stores) and match torch, forward and backward, on rows and planes of whole aligned
    chunks and on ones that end inside a cache line (bf16 rows of 1000, 14x14, 23x23 and 7x7
    planes), whose shared lines take plain stores (whole_line_chunk). NCHW batch-norm inference
    walks its planes as one run whose stores stream across their boundaries
    (plane_run_affine): the same bits as the plain walk, at every split over the threads."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, NORMKERNELS_STREAM_STORES="1")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpp",
         os.path.join(here, "test_parity.py")],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]

    code = r"""
import sys
import torch
import torch.nn.functional as TF
import normkernels.functional as NF
sys.path.insert(0, sys.argv[1])  # the tests folder, for samples.py
from samples import assert_close_like_torch

def check(name, fn_ours, fn_torch, x, params):
    runs = []
    for fn, cast in ((fn_ours, None), (fn_torch, None), (fn_torch, torch.float64)):
        xi = (x if cast is None else x.to(cast)).clone().requires_grad_()
        pi = [(p if cast is None else p.to(cast)).clone().requires_grad_() for p in params]
        y = fn(xi, *pi)
        dy = torch.ones_like(y).copy_(DY[: y.numel()].view(y.shape))
        runs.append([y] + list(torch.autograd.grad(y, [xi] + pi, dy)))
    for i, (a, b, r) in enumerate(zip(*runs)):
        assert_close_like_torch(a, b, r, f"{name} {x.dtype} {'output' if i == 0 else i}")

DY = torch.randn(1 << 18, dtype=torch.float64)
for dt in (torch.float32, torch.bfloat16):
  for n in (1024, 1000):
    x = torch.randn(64, n).to(dt)
    w, b = torch.rand(n).to(dt) + 0.5, torch.randn(n).to(dt)
    check("layer_norm", lambda x, w, b: NF.layer_norm(x, (n,), w, b),
          lambda x, w, b: TF.layer_norm(x, (n,), w, b), x, [w, b])
    check("layer_norm no affine", lambda x: NF.layer_norm(x, (n,)),
          lambda x: TF.layer_norm(x, (n,)), x, [])
    check("rms_norm", lambda x, w: NF.rms_norm(x, (n,), w),
          lambda x, w: TF.rms_norm(x, (n,), w), x, [w])
  for hw in (8, 14, 7, 23):
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 64, hw, hw).to(dt).contiguous(memory_format=fmt)
        w, b = torch.rand(64).to(dt) + 0.5, torch.randn(64).to(dt)
        check("group_norm", lambda x, w, b: NF.group_norm(x, 8, w, b),
              lambda x, w, b: TF.group_norm(x, 8, w, b), x, [w, b])
        stats = lambda x: (torch.zeros(64, dtype=x.dtype), torch.ones(64, dtype=x.dtype))
        check("batch_norm train", lambda x, w, b: NF.batch_norm(x, *stats(x), w, b, True),
              lambda x, w, b: TF.batch_norm(x, *stats(x), w, b, True), x, [w, b])
        check("batch_norm eval", lambda x, w, b: NF.batch_norm(x, *stats(x), w, b, False),
              lambda x, w, b: TF.batch_norm(x, *stats(x), w, b, False), x, [w, b])
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code, here], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]

    # NCHW inference, streamed (one run of planes) and plain (plane by plane, or one run up to
    # kPlaneRunSamples samples of short planes), on planes of 7x7 to 23x23, channel counts that
    # wrap inside a run, 1 to 3 threads. (Past that many samples short planes take the blocks,
    # which fold the shift: other bits, as close to torch's.) Training, streamed or not: the same
    # bits whatever the threads.
    infer = r"""
import sys
import torch
import normkernels.functional as NF
torch.manual_seed(0)
outs = {}
for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for shape in ((6, 5, 14, 14), (3, 7, 23, 23), (3, 9, 7, 7), (2, 11, 9, 9), (5, 13, 10, 10)):
        C = shape[1]
        x = torch.randn(shape).to(dt)
        rm, rv = torch.randn(C).to(dt), (torch.rand(C) + 0.5).to(dt)
        w, b = torch.randn(C).to(dt), torch.randn(C).to(dt)
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs[f"eval {dt} {shape} {threads}"] = NF.batch_norm(x, rm, rv, w, b, False)
            # training: streamed, short planes walk memory in order (short_for_channel_walk)
            xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
            mean, var = rm.clone(), rv.clone()
            y = NF.batch_norm(xr, mean, var, wr, br, True)
            grads = torch.autograd.grad(y, (xr, wr, br), torch.ones_like(y).normal_(
                generator=torch.Generator().manual_seed(1)))
            outs[f"train {dt} {shape} {threads}"] = torch.cat(
                [t.flatten().double() for t in (y, mean, var) + grads])
torch.save(outs, sys.argv[1])
"""
    results = []
    for mode in ("1", "0"):
        path = os.path.join(str(tmp_path), f"stream{mode}.pt")
        out = subprocess.run([sys.executable, "-c", infer, path],
                             env=dict(os.environ, NORMKERNELS_STREAM_STORES=mode),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        results.append(torch.load(path))
    streamed, plain = results
    assert streamed.keys() == plain.keys()
    for key in streamed:
        if key.startswith("eval"):
            assert torch.equal(streamed[key], plain[key]), key
        elif not key.endswith(" 1"):  # training: the same bits on 1, 2 and 3 threads
            for run in results:
                assert torch.equal(run[key], run[key[:-1] + "1"]), key
