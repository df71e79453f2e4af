"""torch.func transforms and forward-mode AD through our norms, against torch's on the same
inputs: grad, vjp (its pullback called after the transform exits), jacrev, jacfwd, hessian,
vmap of grad (per-sample gradients), jvp and torch.autograd.forward_ad (tangents on the input,
the weight, the bias), forward-over-reverse, and create_graph double backward."""
import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import normkernels
import normkernels.functional as NF
from samples import OpRecorder, make_input

C = 6


def _calls(mod, rm, rv):
    """(name, f(x, weight, bias), x shape, parameter size) of every normalization."""
    return [
        ("layer_norm", lambda x, w, b: mod.layer_norm(x, (5,), w, b), (3, 4, 5), 5),
        ("rms_norm", lambda x, w, b: mod.rms_norm(x, (5,), w, 1e-5) + b, (3, 4, 5), 5),
        ("group_norm", lambda x, w, b: mod.group_norm(x, 3, w, b), (2, C, 3, 2), C),
        ("batch_norm", lambda x, w, b: mod.batch_norm(x, None, None, w, b, True), (3, C, 2, 2), C),
        ("batch_norm_infer", lambda x, w, b: mod.batch_norm(x, rm, rv, w, b, False), (3, C, 2, 2), C),
        ("instance_norm", lambda x, w, b: mod.instance_norm(x, None, None, w, b), (2, C, 3, 2), C),
    ]


def _pairs():
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    return [pytest.param(t[0], t[1], o[1], t[2], t[3], id=t[0]) for t, o in zip(_calls(F, rm, rv), _calls(NF, rm, rv))]


def _transforms(f, x, w, b, tx, tw, tb, per_sample):
    """Every transform of f at (x, w, b), as {name: tensors}."""
    weights = torch.arange(x.numel(), dtype=x.dtype).view(x.shape).sin()

    def loss(x, w, b):  # a scalar whose gradients differ from element to element
        return (f(x, w, b) ** 2 * weights[: x.shape[0]]).sum()

    out = {}
    out["grad"] = grad(loss, argnums=(0, 1, 2))(x, w, b)
    out["jvp"] = jvp(f, (x, w, b), (tx, tw, tb))
    y, pullback = vjp(f, x, w, b)
    out["vjp"] = pullback(torch.ones_like(y).cumsum(0))  # after vjp's transform has exited
    out["jacrev"] = jacrev(f, argnums=(0, 1))(x, w, b)
    out["jacfwd"] = jacfwd(f, argnums=(0, 1))(x, w, b)
    out["hessian"] = hessian(loss)(x, w, b)
    out["jacrev_jacrev"] = jacrev(jacrev(loss))(x, w, b)
    out["jvp_of_grad"] = jvp(lambda x: grad(loss)(x, w, b), (x,), (tx,))[1]
    if per_sample:  # per-sample gradients, as Opacus computes them: each sample a batch of one
        out["vmap_grad"] = vmap(grad(loss, argnums=(0, 1)), in_dims=(0, None, None))(x[:, None], w, b)
    for name, tangents in (("fwad_x_w", (tx, tw, None)), ("fwad_b", (None, None, tb))):
        with fwAD.dual_level():
            duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip((x, w, b), tangents)]
            out[name] = fwAD.unpack_dual(f(*duals)).tangent
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    gx, gw = torch.autograd.grad(loss(xr, wr, b), (xr, wr), create_graph=True)
    out["double_backward"] = torch.autograd.grad((gx * tx).sum() + (gw * tw).sum(), (xr, wr))
    return out


@pytest.mark.parametrize("name,torch_f,our_f,shape,n", _pairs())
def test_transforms_match_torch(name, torch_f, our_f, shape, n):
    x = torch.randn(shape, dtype=torch.float64)
    w, b = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    # batch norm's statistics are over the batch: a batch of one is not a per-sample gradient
    per_sample = not name.startswith("batch_norm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "no batching rule" performance warning
        theirs = _transforms(torch_f, x, w, b, tx, tw, tb, per_sample)
        ours = _transforms(our_f, x, w, b, tx, tw, tb, per_sample)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        t, o = theirs[key], ours[key]
        t, o = (t, o) if isinstance(t, tuple) else ((t,), (o,))
        assert len(t) == len(o), key
        for a, c in zip(t, o):
            assert c is not None, key
            torch.testing.assert_close(c, a, atol=1e-9, rtol=1e-7, msg=f"{name} {key}")


_FORWARD_AD_CASES = [
    ("layer_norm", lambda m, x, w, b: m.layer_norm(x, (8,), w, b), (4, 3, 8), 8, "strided"),
    ("rms_norm", lambda m, x, w, b: m.rms_norm(x, (8,), w, 1e-5), (6, 8), 8, "contiguous"),
    ("group_norm", lambda m, x, w, b: m.group_norm(x, 2, w, b), (2, 4, 3, 3), 4, "channels_last"),
    ("batch_norm", lambda m, x, w, b: m.batch_norm(x, None, None, w, b, True), (3, 4, 2, 3), 4, "channels_last"),
    ("batch_norm_infer", lambda m, x, w, b: m.batch_norm(x, *_running(x), w, b, False), (3, 4, 2, 3), 4, "strided"),
]


def _running(x):  # running statistics of x's dtype, as torch requires with weights of x's dtype
    return torch.linspace(-1, 1, 4, dtype=x.dtype), torch.linspace(0.5, 2, 4, dtype=x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,f,shape,n,layout", [pytest.param(*c, id=c[0]) for c in _FORWARD_AD_CASES])
def test_forward_ad_tangent_like_torch(name, f, shape, n, layout, dtype, backend_name):
    """y's tangent, for every dtype and layout, with and without a graph being recorded: as close
    to the fp64 tangent as torch's, in y's dtype and layout. Before, an input that did not
    require grad lost its tangent silently."""
    x = make_input(shape, layout, dtype)
    w, b = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    tx = make_input(shape, layout, dtype)
    tw = torch.randn(n, dtype=dtype)

    def tangent(mod, cast, requires_grad):
        with fwAD.dual_level():
            xd = fwAD.make_dual(cast(x).requires_grad_(requires_grad), cast(tx))
            y = f(mod, xd, fwAD.make_dual(cast(w), cast(tw)), cast(b))
            return fwAD.unpack_dual(y).primal, fwAD.unpack_dual(y).tangent

    # torch's from contiguous copies: its GroupNorm forward AD raises on channels_last inputs
    # (torch 2.13: "view size is not compatible with input tensor's size and stride")
    _, ref = tangent(F, lambda t: t.detach().double().contiguous(), False)
    _, theirs = tangent(F, lambda t: t.detach().contiguous(), False)
    for requires_grad in (False, True):
        y, ours = tangent(NF, lambda t: t.detach().clone(), requires_grad)
        assert ours is not None and ours.dtype == dtype and ours.shape == y.shape
        assert ours.stride() == y.stride()
        err = (ours.double() - ref).abs().max().item()
        torch_err = (theirs.double() - ref).abs().max().item()
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype] * ref.abs().max().item()
        assert err <= max(2 * torch_err, tol), (err, torch_err)


_OWN_OPS = {"layer_norm": ("layer_norm_fwd", "layer_norm_bwd"), "rms_norm": ("layer_norm_fwd", "layer_norm_bwd"),
            "group_norm": ("group_norm_fwd", "group_norm_bwd"), "instance_norm": ("group_norm_fwd", "group_norm_bwd"),
            "batch_norm": ("batch_norm_fwd", "batch_norm_bwd"), "batch_norm_infer": ("batch_norm_infer", "batch_norm_bwd")}


@pytest.mark.parametrize("name,torch_f,our_f,shape,n", _pairs())
def test_transforms_run_our_kernels_and_no_aten_norm_op(name, torch_f, our_f, shape, n):
    """jvp, grad, vjp, vmap of grad and a create_graph double backward dispatch our forward and
    backward ops, and no ATen norm op."""
    x = torch.randn(shape, dtype=torch.float64)
    w, b = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    with OpRecorder() as rec:
        jvp(our_f, (x, w, b), (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)))
        grad(lambda x: our_f(x, w, b).pow(2).sum())(x)
        vjp(our_f, x, w, b)[1](torch.randn_like(x))
        if not name.startswith("batch_norm"):  # batch statistics need a batch
            vmap(grad(lambda x: our_f(x[None], w, b).pow(2).sum()))(x)
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(our_f(xr, w, b).pow(3).sum(), xr, create_graph=True)
        gx.pow(2).sum().backward()
    assert {f"normkernels.{op}.default" for op in _OWN_OPS[name]} <= set(rec.names)
    assert not {n for n in rec.names if n.startswith("aten.") and "norm" in n}, set(rec.names)


def _unet_block():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.Flatten(),
        torch.nn.LayerNorm(8 * 4 * 4), torch.nn.Linear(8 * 4 * 4, 2),
    )


def test_model_transforms_after_convert():
    """A converted model under the transforms users run on whole models: per-sample gradients
    (vmap of grad over functional_call) and a jvp through the network (as in continuous-time
    consistency training of diffusion models)."""
    model = _unet_block().double()
    ours = normkernels.convert(copy.deepcopy(model))
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    results = []
    for m in (model, ours):
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(p, xi):
            return functional_call(m, p, (xi[None],)).pow(2).sum()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
        _, tangent = jvp(lambda xi: m(xi), (x,), (torch.ones_like(x),))
        results.append((per_sample, tangent))
    (ps_t, tan_t), (ps_o, tan_o) = results
    torch.testing.assert_close(tan_o, tan_t, atol=1e-9, rtol=1e-7)
    assert ps_t.keys() == ps_o.keys()
    for k in ps_t:
        torch.testing.assert_close(ps_o[k], ps_t[k], atol=1e-9, rtol=1e-7, msg=k)


def _vmap_cases():
    B, dt = 3, torch.float64
    x = torch.randn(B, 2, C, 3, 2, dtype=dt)
    x_at2 = x.movedim(0, 2).contiguous()  # the vmapped dim in the middle
    x_cl = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # channels_last samples
    w, wb = torch.randn(C, dtype=dt), torch.randn(B, C, dtype=dt)
    w2, w2b = torch.randn(2, dtype=dt), torch.randn(B, 2, dtype=dt)
    rm, rv = torch.randn(C, dtype=dt), torch.rand(C, dtype=dt) + 0.5
    rmb, rvb = torch.randn(B, C, dtype=dt), torch.rand(B, C, dtype=dt) + 0.5
    ln = lambda m, x, w, b: m.layer_norm(x, (2,), w, b)  # noqa: E731
    rms = lambda m, x, w: m.rms_norm(x, (3, 2), w, 1e-5)  # noqa: E731
    gn = lambda m, x, w, b: m.group_norm(x, 3, w, b)  # noqa: E731
    bn = lambda m, x, w, b: m.batch_norm(x, None, None, w, b, True)  # noqa: E731
    bi = lambda m, x, rm, rv, w, b: m.batch_norm(x, rm, rv, w, b, False)  # noqa: E731
    inn = lambda m, x, w: m.instance_norm(x, weight=w)  # noqa: E731
    return [  # (id, f, args, in_dims): x vmapped at 0 or 2, parameters vmapped (ensembles), x not
        ("layer_norm", ln, (x, w2, w2), (0, None, None)),
        ("layer_norm-dim2", ln, (x_at2, w2, w2), (2, None, None)),
        ("layer_norm-weights", ln, (x, w2b, w2), (0, 0, None)),
        ("layer_norm-only-weights", ln, (x[0], w2b, w2b), (None, 0, 0)),
        ("rms_norm", rms, (x, torch.randn(3, 2, dtype=dt)), (0, None)),
        ("rms_norm-weights", rms, (x, torch.randn(B, 3, 2, dtype=dt)), (0, 0)),
        ("group_norm", gn, (x, w, w), (0, None, None)),
        ("group_norm-dim2", gn, (x_at2, w, w), (2, None, None)),
        ("group_norm-channels_last", gn, (x_cl, w, w), (0, None, None)),
        ("group_norm-weights", gn, (x, wb, w), (0, 0, None)),
        ("instance_norm-weights", inn, (x, wb), (0, 0)),
        ("batch_norm", bn, (x, w, w), (0, None, None)),
        ("batch_norm-dim2", bn, (x_at2, w, w), (2, None, None)),
        ("batch_norm-channels_last", bn, (x_cl, w, None), (0, None, None)),
        ("batch_norm-weights", bn, (x, wb, wb), (0, 0, 0)),
        ("batch_norm-only-weights", bn, (x[0], wb, None), (None, 0, None)),
        ("batch_norm_infer", bi, (x, rm, rv, w, w), (0, None, None, None, None)),
        ("batch_norm_infer-dim2", bi, (x_at2, rm, rv, w, w), (2, None, None, None, None)),
        ("batch_norm_infer-stats", bi, (x, rmb, rvb, wb, w), (0, 0, 0, 0, None)),
        ("batch_norm_infer-only-stats", bi, (x[0], rmb, rv, w, None), (None, 0, None, None, None)),
    ]


@pytest.mark.parametrize("f,args,in_dims", [pytest.param(*c[1:], id=c[0]) for c in _vmap_cases()])
def test_vmap_one_kernel_call_like_torch(f, args, in_dims):
    """vmap of every forward op: torch's values, from one call of our kernel for the whole batch
    (a batching rule; torch's fallback would call it once a sample, with a warning)."""
    # torch's from contiguous copies: its group norm raises under vmap on channels_last samples
    # (torch 2.13: "NYI: querying is_contiguous inside of vmap for memory_format other than ...")
    expected = vmap(lambda *a: f(F, *a), in_dims=in_dims)(*[a if a is None else a.contiguous() for a in args])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "performance drop ... batching rule" warning
        with OpRecorder() as counter:
            got = vmap(lambda *a: f(NF, *a), in_dims=in_dims)(*args)
    assert counter.ours() == 1
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)


def test_vmap_nested_and_half():
    x = torch.randn(3, 4, 5, 8)
    nested = lambda m: vmap(vmap(lambda x: m.layer_norm(x, (8,))))(x)  # noqa: E731
    torch.testing.assert_close(nested(NF), nested(F))
    # vmapped weights of a half input: the affine applied in fp32 after the kernel
    xb, wb = x.to(torch.bfloat16), torch.randn(3, 8)
    ens = lambda m, x: vmap(lambda x, w: m.layer_norm(x, (8,), w))(x, wb)  # noqa: E731
    ref = ens(F, xb.double()).to(torch.bfloat16)
    ours, theirs = ens(NF, xb), vmap(lambda x, w: F.layer_norm(x, (8,), w.to(torch.bfloat16)))(xb, wb)
    assert (ours.double() - ref.double()).abs().max() <= 2 * (theirs.double() - ref.double()).abs().max() + 1e-2


def _bwd_op_cases():
    """(id, op name, per-sample args, in_dims): every backward op vmapped over dy alone, over
    everything, and over the weight, with full and partial output masks."""
    B, d = 3, torch.float64
    ops = torch.ops.normkernels
    cases = []
    x = torch.randn(B, 4, 6, dtype=d)
    _, mean, rstd = ops.layer_norm_fwd(x.flatten(0, 1), 1, None, None, 1e-5, False)
    mean, rstd = mean.view(B, -1), rstd.view(B, -1)
    w, wb, dy = torch.randn(6, dtype=d), torch.randn(B, 6, dtype=d), torch.randn(B, 4, 6, dtype=d)
    for mask in ([True, True, True], [False, True, False]):
        cases.append((f"layer_norm_bwd-dy-{mask}", "layer_norm_bwd", (dy, x[0], mean[0], rstd[0], w, 1, False, mask), (0, None, None, None, None, None, None, None)))
        cases.append((f"layer_norm_bwd-all-{mask}", "layer_norm_bwd", (dy, x, mean, rstd, wb, 1, False, mask), (0, 0, 0, 0, 0, None, None, None)))
    _, _, rrms = ops.layer_norm_fwd(x.flatten(0, 1), 1, None, None, 1e-5, True)
    cases.append(("rms_norm_bwd", "layer_norm_bwd", (dy, x, torch.empty(0, dtype=d), rrms.view(B, -1), w, 1, True, [True, True, False]), (0, 0, None, 0, None, None, None, None)))
    xg = torch.randn(B, 2, 6, 3, dtype=d)
    _, gm, gr = ops.group_norm_fwd(xg.flatten(0, 1), 3, None, None, 1e-5)
    gm, gr = gm.unflatten(0, (B, -1)), gr.unflatten(0, (B, -1))
    dyg = torch.randn_like(xg)
    cases.append(("group_norm_bwd-all", "group_norm_bwd", (dyg, xg, gm, gr, wb, 3, [True, True, True]), (0, 0, 0, 0, 0, None, None)))
    cases.append(("group_norm_bwd-dy", "group_norm_bwd", (dyg, xg[0], gm[0], gr[0], w, 3, [True, False, True]), (0, None, None, None, None, None, None)))
    xb = torch.randn(B, 4, 6, 2, dtype=d)
    stats = [ops.batch_norm_fwd(xb[i], None, None, 1e-5) for i in range(B)]
    bm, bi = torch.stack([s[1] for s in stats]), torch.stack([s[2] for s in stats])
    dyb = torch.randn_like(xb)
    cases.append(("batch_norm_bwd-all", "batch_norm_bwd", (dyb, xb, bm, bi, wb, True, [True, True, True]), (0, 0, 0, 0, 0, None, None)))
    cases.append(("batch_norm_bwd-dy", "batch_norm_bwd", (dyb, xb[0], bm[0], bi[0], w, True, [True, True, False]), (0, None, None, None, None, None, None)))
    cases.append(("batch_norm_bwd-infer", "batch_norm_bwd", (dyb, xb, bm[0], bi[0], w, False, [True, True, True]), (0, 0, None, None, None, None, None)))
    return cases


@pytest.mark.parametrize("name,args,in_dims", [pytest.param(*c[1:], id=c[0]) for c in _bwd_op_cases()])
def test_vmap_backward_ops_like_a_loop(name, args, in_dims):
    """vmap of every backward op: the same as calling it once per instance, with no fallback
    warning; one kernel call for the whole batch, except where layer or group norm's
    per-instance dweight/dbias are asked (which one folded call would sum): one an instance."""
    op = getattr(torch.ops.normkernels, name)
    size = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    pick = lambda i: [a if d is None else a.select(d, i) for a, d in zip(args, in_dims)]  # noqa: E731
    loop = [op(*pick(i)) for i in range(size)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with OpRecorder() as counter:
            got = vmap(lambda *a: op(*a), in_dims=in_dims)(*args)
    mask, weight = args[-1], args[4]
    per_instance = name != "batch_norm_bwd" and (mask[2] or (mask[1] and weight is not None))
    assert counter.ours() == (size if per_instance else 1)
    for k in range(3):
        expected = [out[k] for out in loop]
        if expected[0].numel() == 0:  # not asked for
            assert got[k].numel() == 0
            continue
        torch.testing.assert_close(got[k], torch.stack(expected), atol=1e-10, rtol=1e-8)
