"""The op layer: torch.library.opcheck on every op (schema, fake kernel, autograd registration,
AOT dispatch), fp64 gradcheck through every functional, and that masked outputs are skipped."""
import pytest
import torch

import normkernels.functional as NF
from normkernels.backend import current as current_backend
from normkernels.backend import triton_interpreter
from samples import make_input

ops = torch.ops.normkernels


def _x(shape, layout="contiguous", dtype=torch.float32, grad=True):
    return make_input(shape, layout, dtype).detach().requires_grad_(grad)


def _p(n, dtype=torch.float32, grad=True):
    return torch.randn(n, dtype=dtype).requires_grad_(grad)


def op_samples():
    s = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        s.append(("layer_norm_fwd", (_x((4, 5, 24), dtype=dtype), 1, _p(24, dtype), _p(24, dtype), 1e-5, False)))
        s.append(("layer_norm_fwd", (_x((3, 4, 6), "strided", dtype), 2, None, None, 1e-5, False)))
        s.append(("layer_norm_fwd", (_x((6, 40), dtype=dtype), 1, _p(40, dtype), None, 1e-6, True)))
    for layout in ("contiguous", "channels_last", "strided"):
        s.append(("group_norm_fwd", (_x((2, 6, 3, 5), layout), 3, _p(6), _p(6), 1e-5)))
        s.append(("batch_norm_fwd", (_x((3, 4, 3, 5), layout), _p(4), _p(4), 1e-5)))
        s.append(("batch_norm_infer", (_x((3, 4, 3, 5), layout), torch.randn(4), torch.rand(4) + 0.5, _p(4), _p(4), 1e-5)))
    s.append(("group_norm_fwd", (_x((2, 4, 2, 3, 3), "channels_last"), 4, None, None, 1e-5)))
    s.append(("batch_norm_fwd", (_x((8, 5)), None, _p(5), 1e-3)))
    s.append(("batch_norm_fwd", (_x((2, 3, 2, 3, 2), "channels_last", torch.bfloat16), _p(3), _p(3), 1e-5)))
    # backward ops with partial masks
    x = torch.randn(6, 16)
    _, mean, rstd = ops.layer_norm_fwd(x, 1, torch.randn(16), None, 1e-5, False)
    s.append(("layer_norm_bwd", (torch.randn(6, 16), x, mean, rstd, torch.randn(16), 1, False, [True, False, True])))
    x = torch.randn(2, 6, 4, 4).contiguous(memory_format=torch.channels_last)
    _, mean, rstd = ops.group_norm_fwd(x, 2, None, None, 1e-5)
    s.append(("group_norm_bwd", (torch.randn(2, 6, 4, 4), x, mean, rstd, torch.randn(6), 2, [False, True, True])))
    _, mean, invstd, _ = ops.batch_norm_fwd(x, None, None, 1e-5)
    s.append(("batch_norm_bwd", (torch.randn(2, 6, 4, 4), x, mean, invstd, torch.randn(6), True, [True, True, False])))
    s.append(("batch_norm_bwd", (torch.randn(2, 6, 4, 4), x, mean, invstd, None, False, [True, False, False])))
    return s


@pytest.mark.parametrize("name,args", [pytest.param(n, a, id=f"{n}-{i}") for i, (n, a) in enumerate(op_samples())])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops, name).default, args)


def _forward_op_samples():
    """Every forward op on the three layouts and four float dtypes, affine or not; running
    statistics in the input's dtype, as a module converted to it holds them. Seeded (tolerances
    are per dtype, not per draw) without touching the global generator the other tests use."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        s = []
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            w, b = _p(6, dtype, False), _p(6, dtype, False)
            mean, var = torch.randn(6).to(dtype), (torch.rand(6) + 0.5).to(dtype)
            rows = _x((4, 5, 6), dtype=dtype, grad=False)
            s.append(("layer_norm_fwd", (rows, 1, w, b, 1e-5, False)))
            strided = _x((3, 4, 6), "strided", dtype, False)
            s.append(("layer_norm_fwd", (strided, 2, None, None, 1e-5, False)))
            s.append(("layer_norm_fwd", (rows[0], 1, w, None, 1e-6, True)))
            for layout in ("contiguous", "channels_last", "strided"):
                x = _x((3, 6, 3, 5), layout, dtype, False)
                s.append(("group_norm_fwd", (x, 3, w, b, 1e-5)))
                s.append(("batch_norm_fwd", (x, w, None, 1e-5)))
                s.append(("batch_norm_infer", (x, mean, var, w, b, 1e-5)))
            x3 = _x((2, 6, 7), dtype=dtype, grad=False)
            s.append(("group_norm_fwd", (x3, 6, None, None, 1e-5)))
            s.append(("batch_norm_fwd", (_x((8, 6), dtype=dtype, grad=False), None, b, 1e-3)))
        return s


def test_every_forward_op_has_a_decomposition():
    """What exporters lower ops they cannot translate by (torch.onnx.export): every op of ours
    but the backward ones (exported graphs are inference graphs)."""
    names = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
             if name.startswith("normkernels::")}
    forward = {name for name in names if not name.endswith("_bwd")}
    assert forward, names
    decomposed = {name for name in forward
                  if getattr(ops, name).default in torch._decomp.decomposition_table}
    assert decomposed == forward


@pytest.mark.parametrize("name,args", [pytest.param(n, a, id=f"{n}-{i}")
                                       for i, (n, a) in enumerate(_forward_op_samples())])
def test_decomposition_matches_the_op(name, args):
    """Each output of an op's decomposition (normkernels/_decompositions.py: ATen's elementary
    and norm ops) against the op's: same dtypes and shapes, values within a rounding of the
    input's dtype (ATen's norm ops give half inputs' statistics rounded to it)."""
    op = getattr(ops, name).default
    expected = op(*args)
    got = torch._decomp.decomposition_table[op](*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert (g.dtype, g.shape) == (e.dtype, e.shape), i
        tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-5,
               torch.float64: 1e-12}[args[0].dtype]
        torch.testing.assert_close(g, e, rtol=tol, atol=tol, msg=f"output {i}")


def _gc(fn, *inputs):
    """Numerical gradients against ours; on the C++ backend also forward mode
    (torch.autograd.forward_ad) and both under vmap (batched gradients and tangents). Under the
    Triton interpreter those add a minute to these tests; test_transforms.py runs forward mode
    on both backends. The interpreted Triton kernels are checked in gradcheck's fast mode (the
    Jacobian against random vectors on both sides, not column by column): the full Jacobian,
    two interpreted forwards per input element, took 8 of the suite's 22 minutes on the 2-vCPU
    guest; every gradient of theirs is also compared with torch's in test_parity, and full mode
    still runs on the C++ kernels and on CUDA."""
    full = current_backend() != "triton"
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, check_forward_ad=full,
                                    check_batched_grad=full, check_batched_forward_grad=full,
                                    fast_mode=triton_interpreter() and not full)


def _d(shape, layout="contiguous"):
    return _x(shape, layout, torch.float64)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_gradcheck_layer_and_rms_norm(layout, backend_name):
    _gc(lambda x, w, b: NF.layer_norm(x, (7,), w, b), _d((3, 4, 7), layout), _p(7, torch.float64), _p(7, torch.float64))
    _gc(lambda x, w: NF.rms_norm(x, [4, 7], w, 1e-5), _d((3, 4, 7), layout), _p((4, 7), torch.float64))
    _gc(lambda x: NF.layer_norm(x, (4, 7)), _d((3, 4, 7), layout))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_gradcheck_group_and_instance_norm(layout, backend_name):
    _gc(lambda x, w, b: NF.group_norm(x, 2, w, b), _d((2, 4, 3, 3), layout), _p(4, torch.float64), _p(4, torch.float64))
    _gc(lambda x, w, b: NF.instance_norm(x, weight=w, bias=b), _d((2, 4, 3, 3), layout), _p(4, torch.float64), _p(4, torch.float64))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_gradcheck_batch_norm(layout, backend_name):
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    _gc(lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True), _d((3, 3, 2, 3), layout), _p(3, torch.float64), _p(3, torch.float64))
    _gc(lambda x, w, b: NF.batch_norm(x, rm, rv, w, b, training=False), _d((3, 3, 2, 3), layout), _p(3, torch.float64), _p(3, torch.float64))
    _gc(lambda x: NF.batch_norm(x, None, None, training=True), _d((5, 3)))


def test_backward_computes_only_what_is_asked(backend_name):
    x = torch.randn(4, 8)
    _, mean, rstd = ops.layer_norm_fwd(x, 1, None, None, 1e-5, False)
    dx, dw, db = ops.layer_norm_bwd(torch.randn(4, 8), x, mean, rstd, torch.randn(8), 1, False, [True, False, False])
    assert dx.shape == x.shape and dw.numel() == 0 and db.numel() == 0
    w = torch.randn(8, requires_grad=True)
    y = NF.layer_norm(x, (8,), w)  # x needs no grad: only dweight is computed
    (gw,) = torch.autograd.grad(y.sum(), [w])
    assert gw.shape == w.shape


def test_statistics_are_fp32_for_half_inputs(backend_name):
    y, mean, rstd = ops.layer_norm_fwd(torch.randn(3, 8, dtype=torch.bfloat16), 1, None, None, 1e-5, False)
    assert y.dtype == torch.bfloat16 and mean.dtype == rstd.dtype == torch.float32
    _, mean, invstd, var = ops.batch_norm_fwd(torch.randn(3, 2, dtype=torch.float64), None, None, 1e-5)
    assert mean.dtype == invstd.dtype == var.dtype == torch.float64


@pytest.mark.parametrize("shape,ndim", [((2, 3, 8), 1), ((2, 3, 4, 5), 2), ((7,), 1), ((3, 0), 1),
                                        ((0, 4), 1)])
def test_layer_norm_statistics_as_torchs(shape, ndim, backend_name):
    """mean and rstd shaped as native_layer_norm's (x's leading dims, then ones: a DTensor split
    along a leading dim splits them along it too), with its values, rows of no values included
    (mean 0, rstd nan); RMS norm's rstd shaped the same."""
    x = torch.randn(shape, dtype=torch.float64)
    _, mean, rstd = ops.layer_norm_fwd(x, ndim, None, None, 1e-5, False)
    _, want_mean, want_rstd = torch.ops.aten.native_layer_norm(x, shape[len(shape) - ndim:], None,
                                                              None, 1e-5)
    assert mean.shape == want_mean.shape and rstd.shape == want_rstd.shape
    torch.testing.assert_close(mean, want_mean, equal_nan=True)
    torch.testing.assert_close(rstd, want_rstd, equal_nan=True)
    _, rms_mean, rms_rstd = ops.layer_norm_fwd(x, ndim, None, None, 1e-5, True)
    assert rms_mean.numel() == 0 and rms_rstd.shape == want_rstd.shape


def _ggc(fn, *inputs):
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4,
                                        check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_double_backward(layout):
    """create_graph=True backward (gradient penalties, Hessian-vector products) is exact,
    differentiated again by reverse and by forward mode, and under vmap."""
    d = lambda shape: _x(shape, layout if len(shape) == 4 else "contiguous", torch.float64)  # noqa: E731
    w, b = _p(4, torch.float64), _p(4, torch.float64)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    _ggc(lambda x, w, b: NF.group_norm(x, 2, w, b), d((2, 4, 3, 3)), w, b)
    _ggc(lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True), d((3, 4, 2, 3)), w, b)
    _ggc(lambda x, w, b: NF.batch_norm(x, rm, rv, w, b, training=False), d((3, 4, 2, 3)), w, b)
    _ggc(lambda x, w, b: NF.instance_norm(x, weight=w, bias=b), d((2, 4, 3, 3)), w, b)
    _ggc(lambda x, w, b: NF.layer_norm(x, (4,), w, b), d((3, 5, 4)), w, b)
    _ggc(lambda x, w: NF.rms_norm(x, [4], w, 1e-5), d((3, 5, 4)), w)


def test_recorded_backward_runs_our_kernel_and_third_order_is_exact():
    """A backward run with create_graph=True computes its values with our backward op and records
    NormDoubleBackward (closed-form, elementary ops), which autograd differentiates again: third
    derivatives check numerically too."""
    d = torch.float64
    x, w = _p((3, 2, 5), d), _p(5, d)
    rm, rv = torch.randn(4, dtype=d), torch.rand(4, dtype=d) + 0.5
    calls = {
        "layer_norm": (lambda x, w: NF.layer_norm(x, (5,), w), x, w),
        "rms_norm": (lambda x, w: NF.rms_norm(x, (5,), w, 1e-5), x, w),
        "group_norm": (lambda x, w: NF.group_norm(x, 2, w), _p((2, 4, 3), d), _p(4, d)),
        "batch_norm": (lambda x, w: NF.batch_norm(x, None, None, w, None, True), _p((3, 4, 2), d), _p(4, d)),
        "batch_norm_infer": (lambda x, w: NF.batch_norm(x, rm, rv, w, None, False), _p((3, 4, 2), d), _p(4, d)),
    }
    for name, (f, xi, wi) in calls.items():
        (gx,) = torch.autograd.grad(f(xi, wi).pow(2).sum(), xi, create_graph=True)
        assert gx.grad_fn.name() == "normkernels::NormDoubleBackward", name

        def first_grads(x, w, f=f):
            return torch.autograd.grad(f(x, w).pow(3).sum(), (x, w), create_graph=True)

        assert torch.autograd.gradgradcheck(first_grads, (xi, wi), atol=1e-5, rtol=1e-4), name


def test_gradient_penalty_matches_torch():
    torch.manual_seed(0)
    import copy

    import normkernels

    critic = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(),
                                 torch.nn.Linear(16, 1))
    ours = normkernels.convert(copy.deepcopy(critic))
    x = torch.randn(8, 6)
    grads = []
    for model in (critic, ours):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(model(xi).sum(), xi, create_graph=True)
        penalty = ((gx.norm(dim=1) - 1) ** 2).mean()
        penalty.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert (a is None) == (b is None)  # the last bias does not enter the penalty
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert grads[1][0] is not None and grads[1][2] is not None  # LayerNorm's weight got one


def _recorded_calls():
    """One recorded forward of each autograd node (LayerNorm, RMSNorm, GroupNorm, BatchNorm in
    training and in inference) and the input/parameters it depends on."""
    x4 = lambda: _x((2, 4, 3, 3))  # noqa: E731
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    return [
        ("layer_norm", lambda x, w, b: NF.layer_norm(x, (5,), w, b), _x((3, 5)), _p(5), _p(5)),
        ("rms_norm", lambda x, w, b: NF.rms_norm(x, [5], w), _x((3, 5)), _p(5), None),
        ("group_norm", lambda x, w, b: NF.group_norm(x, 2, w, b), x4(), _p(4), _p(4)),
        ("batch_norm", lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True), x4(), _p(4), _p(4)),
        ("batch_norm_infer", lambda x, w, b: NF.batch_norm(x, rm, rv, w, b, training=False), x4(), _p(4), _p(4)),
    ]


@pytest.mark.parametrize("name,fn,x,w,b", [pytest.param(*c, id=c[0]) for c in _recorded_calls()])
def test_autograd_graph_behaves_like_torchs(name, fn, x, w, b):
    """The recorded node keeps torch's rules: edges to exactly the inputs that require grad,
    saved tensors freed after backward, in-place changes to a saved input caught."""
    y = fn(x, w, b)
    assert y.requires_grad and y.grad_fn is not None
    edges = [f for f, _ in y.grad_fn.next_functions]
    assert len(edges) == 3 and all(f is not None for f, p in zip(edges, (x, w, b)) if p is not None)
    y.sum().backward()
    assert x.grad is not None and (w.grad is not None) and (b is None or b.grad is not None)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    # only the parameters require grad: no gradient reaches x, and none is asked of it
    xs = x.detach()
    y = fn(xs, w, b)
    (gw,) = torch.autograd.grad(y.sum(), [w])
    assert gw.shape == w.shape
    # a saved input modified in place before backward
    xv = x.detach().clone().requires_grad_()
    xc = xv * 1
    y = fn(xc, w, b)
    xc.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


_BACKWARD_OP = {"layer_norm": "layer_norm_bwd", "rms_norm": "layer_norm_bwd",
                "group_norm": "group_norm_bwd", "batch_norm": "batch_norm_bwd",
                "batch_norm_infer": "batch_norm_bwd"}


@pytest.mark.parametrize("name,fn,x,w,b", [pytest.param(*c, id=c[0]) for c in _recorded_calls()])
def test_compiled_autograd_runs_our_backward(name, fn, x, w, b):
    """An eager forward whose backward runs under compiled autograd: our node traces into its
    graph as our backward op (no ATen norm op), and its gradients are the eager backward's, on
    the first call (trace) and on a second call with new values (the cached graph)."""
    from torch._dynamo import compiled_autograd

    traced = []

    def compiler_fn(gm):
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch.compile(gm, backend="eager", fullgraph=True)

    inputs = [t for t in (x, w, b) if t is not None]
    for step in range(2):
        leaves = [(t.detach() + step).requires_grad_() for t in inputs]
        args = leaves + [None] * (3 - len(leaves))
        dy = torch.randn_like(x)
        expected = torch.autograd.grad(fn(*args), leaves, dy)
        y = fn(*args)
        with compiled_autograd._enable(compiler_fn):
            (y * dy).sum().backward()
        for leaf, e in zip(leaves, expected):
            torch.testing.assert_close(leaf.grad, e)
    assert f"normkernels.{_BACKWARD_OP[name]}.default" in traced
    # no norm op but ours: neither an ATen one nor torch's own backward node
    assert not any("norm" in t.lower() and not t.startswith("normkernels.") for t in traced)
    assert sum(t == f"normkernels.{_BACKWARD_OP[name]}.default" for t in traced) == 1  # traced once


def _bad_op_calls():
    """Direct op calls with a parameter or statistic of the wrong size, dtype or device, or a bad
    dim or group count: (id, call, the message's start). The kernels read these as flat arrays of
    a length x decides, so each must raise before any kernel runs (functional checks first; these
    reach the op from torch.ops or TorchScript)."""
    x2, x3 = torch.randn(2, 3), torch.randn(2, 4, 3)
    mask = [True, True, True]
    ln, gn, bn = ops.layer_norm_fwd, ops.group_norm_fwd, ops.batch_norm_fwd
    return [
        ("ln-weight", lambda: ln(x2, 1, torch.ones(2), None, 1e-5, False), "layer_norm: expected weight of shape [3]"),
        ("ln-bias", lambda: ln(x2, 1, None, torch.ones(4), 1e-5, False), "layer_norm: expected bias of shape [3]"),
        ("ln-weight-2d", lambda: ln(x2, 1, torch.ones(3, 1), None, 1e-5, False), "layer_norm: expected weight of shape [3]"),
        ("ln-weight-int", lambda: ln(x2, 1, torch.ones(3, dtype=torch.int32), None, 1e-5, False), "layer_norm: expected a floating-point weight"),
        ("ln-ndim", lambda: ln(x2, 3, None, None, 1e-5, False), "layer_norm: normalized_ndim out of range"),
        ("ln-bwd-ndim", lambda: ops.layer_norm_bwd(x2, x2, torch.ones(2), torch.ones(2), None, 0, False, mask), "layer_norm_bwd: normalized_ndim out of range"),
        ("ln-bwd-rstd", lambda: ops.layer_norm_bwd(x2, x2, torch.ones(2), torch.ones(1), None, 1, False, mask), "layer_norm_bwd: expected rstd of 2 values"),
        ("ln-bwd-mean", lambda: ops.layer_norm_bwd(x2, x2, torch.ones(3), torch.ones(2), None, 1, False, mask), "layer_norm_bwd: expected mean of 2 values"),
        ("ln-bwd-weight", lambda: ops.layer_norm_bwd(x2, x2, torch.ones(2), torch.ones(2), torch.ones(5), 1, False, mask), "layer_norm_bwd: expected weight of shape [3]"),
        ("ln-bwd-dy", lambda: ops.layer_norm_bwd(x3, x2, torch.ones(2), torch.ones(2), None, 1, False, mask), "layer_norm_bwd: dy and x differ in shape"),
        ("gn-weight", lambda: gn(x3, 2, torch.ones(2), None, 1e-5), "group_norm: expected weight of shape [4]"),
        ("gn-bias", lambda: gn(x3, 2, None, torch.ones(8), 1e-5), "group_norm: expected bias of shape [4]"),
        ("gn-bwd-groups", lambda: ops.group_norm_bwd(x3, x3, torch.ones(6), torch.ones(6), None, 3, mask), "group_norm_bwd: expected number of channels"),
        ("gn-bwd-mean", lambda: ops.group_norm_bwd(x3, x3, torch.ones(2), torch.ones(4), None, 2, mask), "group_norm_bwd: expected mean of 4 values"),
        ("gn-bwd-rstd", lambda: ops.group_norm_bwd(x3, x3, torch.ones(4), torch.ones(8), None, 2, mask), "group_norm_bwd: expected rstd of 4 values"),
        ("gn-bwd-weight", lambda: ops.group_norm_bwd(x3, x3, torch.ones(4), torch.ones(4), torch.ones(3), 2, mask), "group_norm_bwd: expected weight of shape [4]"),
        ("bn-weight", lambda: bn(x3, torch.ones(2), None, 1e-5), "batch_norm: expected weight of shape [4]"),
        ("bn-bias", lambda: bn(x3, None, torch.ones(5), 1e-5), "batch_norm: expected bias of shape [4]"),
        ("bn-infer-mean", lambda: ops.batch_norm_infer(x3, torch.ones(3), torch.ones(4), None, None, 1e-5), "batch_norm: expected mean of 4 values"),
        ("bn-infer-var", lambda: ops.batch_norm_infer(x3, torch.ones(4), torch.ones(5), None, None, 1e-5), "batch_norm: expected var of 4 values"),
        ("bn-infer-weight", lambda: ops.batch_norm_infer(x3, torch.ones(4), torch.ones(4), torch.ones(3), None, 1e-5), "batch_norm: expected weight of shape [4]"),
        ("bn-infer-bias", lambda: ops.batch_norm_infer(x3, torch.ones(4), torch.ones(4), None, torch.ones(1), 1e-5), "batch_norm: expected bias of shape [4]"),
        ("bn-bwd-mean", lambda: ops.batch_norm_bwd(x3, x3, torch.ones(2), torch.ones(4), None, True, mask), "batch_norm_bwd: expected mean of 4 values"),
        ("bn-bwd-invstd", lambda: ops.batch_norm_bwd(x3, x3, torch.ones(4), torch.ones(3), None, True, mask), "batch_norm_bwd: expected invstd of 4 values"),
        ("bn-bwd-weight", lambda: ops.batch_norm_bwd(x3, x3, torch.ones(4), torch.ones(4), torch.ones(4, 1), True, mask), "batch_norm_bwd: expected weight of shape [4]"),
        ("bn-bwd-dy", lambda: ops.batch_norm_bwd(x2, x3, torch.ones(4), torch.ones(4), None, True, mask), "batch_norm_bwd: dy and x differ in shape"),
    ]


@pytest.mark.parametrize("call,message", [pytest.param(c, m, id=i) for i, c, m in _bad_op_calls()])
def test_ops_check_their_arguments(call, message, backend_name):
    with pytest.raises(RuntimeError) as info:
        call()
    assert str(info.value).startswith(message), str(info.value)


def test_ops_accept_statistics_of_another_float_dtype(backend_name):
    """The backward ops take the statistics of any floating dtype and layout (they read them as
    the accumulation dtype): fp64 or strided statistics give what the forward's own give."""
    x, dy, w = torch.randn(6, 8), torch.randn(6, 8), torch.randn(8)
    _, mean, rstd = ops.layer_norm_fwd(x, 1, w, None, 1e-5, False)
    want = ops.layer_norm_bwd(dy, x, mean, rstd, w, 1, False, [True, True, True])
    got = ops.layer_norm_bwd(dy, x, mean.double(), torch.stack([rstd, rstd], 1)[:, 0], w, 1, False,
                             [True, True, True])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    x4 = torch.randn(3, 4, 5)
    _, mean, invstd, _ = ops.batch_norm_fwd(x4, None, None, 1e-5)
    want = ops.batch_norm_bwd(x4, x4, mean, invstd, None, True, [True, False, True])
    got = ops.batch_norm_bwd(x4, x4, mean.double(), invstd.double(), None, True, [True, False, True])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
