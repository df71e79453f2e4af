"""normkernels.functional: bad input raises what torch raises, before any kernel runs; NaN stays
where it is; constant input gives zeros; mixed dtypes and edge sizes behave like torch."""
import pytest
import torch
import torch.nn.functional as TF

import normkernels
import normkernels.functional as NF
from samples import OpRecorder


BAD_INPUT = {
    "layer_norm-shape": lambda F: F.layer_norm(torch.randn(2, 3), (4,)),
    "layer_norm-empty-shape": lambda F: F.layer_norm(torch.randn(2, 3), ()),
    "layer_norm-weight": lambda F: F.layer_norm(torch.randn(2, 3), (3,), torch.randn(4)),
    "layer_norm-int": lambda F: F.layer_norm(torch.ones(2, 3, dtype=torch.long), (3,)),
    "layer_norm-bool": lambda F: F.layer_norm(torch.ones(2, 3, dtype=torch.bool), (3,)),
    "rms_norm-shape": lambda F: F.rms_norm(torch.randn(2, 3), [5]),
    "rms_norm-weight": lambda F: F.rms_norm(torch.randn(2, 3), [3], torch.randn(2)),
    "rms_norm-int": lambda F: F.rms_norm(torch.ones(2, 3, dtype=torch.int32), [3]),
    "group_norm-divisible": lambda F: F.group_norm(torch.randn(2, 6, 3), 4),
    "group_norm-rank": lambda F: F.group_norm(torch.randn(6), 2),
    "group_norm-one-value": lambda F: F.group_norm(torch.randn(1, 4), 4),
    "group_norm-weight": lambda F: F.group_norm(torch.randn(2, 6, 3), 3, torch.randn(5)),
    "group_norm-int": lambda F: F.group_norm(torch.ones(2, 6, 3, dtype=torch.long), 3),
    "batch_norm-one-value": lambda F: F.batch_norm(torch.randn(1, 3), None, None, training=True),
    "batch_norm-one-value-4d": lambda F: F.batch_norm(torch.randn(1, 3, 1, 1), None, None, training=True),
    "batch_norm-running-size": lambda F: F.batch_norm(torch.randn(4, 3), torch.zeros(4), torch.ones(4)),
    "batch_norm-weight": lambda F: F.batch_norm(torch.randn(4, 3), None, None, torch.ones(2), training=True),
    "batch_norm-int": lambda F: F.batch_norm(torch.ones(4, 3, dtype=torch.long), None, None, training=True),
    "instance_norm-spatial": lambda F: F.instance_norm(torch.randn(2, 3, 1)),
    # torch checks the values per statistic before the parameters' dtypes: ValueError first
    "batch_norm-one-value-and-dtype": lambda F: F.batch_norm(
        torch.randn(1, 3), None, None, torch.ones(3, dtype=torch.float64), training=True),
    "instance_norm-spatial-and-dtype": lambda F: F.instance_norm(
        torch.randn(2, 3, 1), weight=torch.ones(3, dtype=torch.float64)),
    "instance_norm-no-stats": lambda F: F.instance_norm(torch.randn(2, 3, 4), use_input_stats=False),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_raises_like_torch_before_any_kernel(name):
    call = BAD_INPUT[name]
    with pytest.raises(Exception) as theirs:
        call(TF)
    recorder = OpRecorder()
    with pytest.raises(type(theirs.value)) as ours:
        with recorder:
            call(NF)
    assert not any(n.startswith("normkernels.") for n in recorder.names), recorder.names
    assert str(ours.value), "the message must tell the user what is wrong"


@pytest.mark.parametrize("family", ["batch_norm", "instance_norm"])
def test_one_running_statistic_like_torch(family, backend_name):
    # running_mean without running_var (or the reverse) with batch statistics: recent torch
    # raises ValueError, torch 2.6 updated the one given; ours does what the installed torch does
    x = torch.randn(4, 3, 5)
    for given in ("running_mean", "running_var"):
        outcomes = []
        for F in (TF, NF):
            stats = {"running_mean": None, "running_var": None}
            stats[given] = torch.full((3,), 0.5)
            call = F.batch_norm if family == "batch_norm" else F.instance_norm
            kwargs = {"training": True} if family == "batch_norm" else {}
            try:
                y = call(x, stats["running_mean"], stats["running_var"], **kwargs)
                outcomes.append(("returned", y, stats[given]))
            except Exception as e:  # noqa: BLE001 (compared below)
                outcomes.append(("raised", type(e)))
        theirs, ours = outcomes
        assert theirs[0] == ours[0], (given, theirs, ours)
        if theirs[0] == "raised":
            assert ours[1] is theirs[1], given
        else:  # the output, and the one running statistic updated
            for t, o in zip(theirs[1:], ours[1:]):
                torch.testing.assert_close(o, t)


def test_module_errors_match_torch():
    with pytest.raises(ValueError):  # num_groups must divide num_channels, at construction
        normkernels.nn.GroupNorm(3, 10)
    with pytest.raises(ValueError):  # wrong rank
        normkernels.nn.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError):  # wrong channel count
        normkernels.nn.BatchNorm2d(3)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError):  # wrong channel count, affine instance norm
        normkernels.nn.InstanceNorm2d(3, affine=True)(torch.randn(2, 4, 3, 3))
    with pytest.raises(RuntimeError):
        normkernels.nn.LayerNorm(8)(torch.randn(2, 7))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_statistics_stay_exact_when_the_mean_dwarfs_the_spread(backend_name, layout):
    # x = 1e4 + N(0, 1) in fp32: a variance from E[x^2] - E[x]^2 cancels to noise here (torch's
    # channels_last CPU GroupNorm is off by ~1e3 on this input), while centered statistics
    # (two-pass, Welford, Chan merges) leave only the error of x's own rounding, ~1e-3 of a
    # standard deviation. Shapes reach the partial chunks of columns and rows (40 channels,
    # 5x7 pixels) and the channels_last GroupNorm path without stripes (2x64x32x32, 8 groups).
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 64, 32, 32), (3, 40, 5, 7)):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) + 1e4).float()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        for name, call in (
            ("group_norm", lambda F, t: F.group_norm(t, 8)),
            ("instance_norm", lambda F, t: F.instance_norm(t)),
            ("batch_norm", lambda F, t: F.batch_norm(t, None, None, training=True)),
            ("layer_norm", lambda F, t: F.layer_norm(t, t.shape[1:])),
        ):
            ref = call(TF, x.double())
            err = (call(NF, x).double() - ref).abs().max().item()
            assert err < 2e-2, (name, shape, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_statistics_of_long_groups_and_planes_like_torch(dtype):
    # NCHW GroupNorm groups and BatchNorm channels longer than L1 have their statistics taken in
    # 16 KB blocks merged by Chan's formula (plane_moments): groups of several blocks and a
    # partial one (6 x 45x47 fp32: 50 KB), planes cut in blocks (70x70 fp32: 19.6 KB) and short
    # planes taken several to a block with a partial last block (7 planes of 30x30). fp32 values
    # ride on an offset 1e3 times their spread, which any cancellation would show; a ramp over
    # the pixels and a shift per sample give the blocks different means, so the merge's
    # between-block term counts.
    g = torch.Generator().manual_seed(0)
    offset = 1e3 if dtype == torch.float32 else 0.0
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    for shape, groups in (((2, 12, 45, 47), 2), ((3, 2, 70, 70), 1), ((7, 3, 30, 30), 3)):
        n, _, h, w = shape
        x64 = torch.randn(shape, generator=g, dtype=torch.float64) + offset
        x64 = x64 + torch.linspace(-2, 2, h * w, dtype=torch.float64).view(h, w)
        x64 = x64 + 0.5 * torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1)
        x = x64.to(dtype)
        rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
        with normkernels.backend("cpp"):
            y_gn = NF.group_norm(x, groups)
            y_bn = NF.batch_norm(x, rm, rv, training=True, momentum=1.0)
        xr = x.double()
        torch.testing.assert_close(y_gn.double(), TF.group_norm(xr, groups), atol=tol, rtol=tol)
        torch.testing.assert_close(y_bn.double(), TF.batch_norm(xr, None, None, training=True),
                                   atol=tol, rtol=tol)
        # momentum 1: the running statistics are the batch's mean and unbiased variance
        torch.testing.assert_close(rm.double(), xr.mean((0, 2, 3)), atol=1e-5 * (1 + offset), rtol=1e-6)
        torch.testing.assert_close(rv.double(), xr.var((0, 2, 3)), atol=1e-4, rtol=1e-3)


def test_long_batch_norm_channels_gradients_as_accurate_as_torch():
    # fp32 NCHW channels of 73728 values (18 statistics blocks, plane_moments): dweight's error
    # is the mean's times sum(dy), so dy with a mean of its own shows any loss in the mean's
    # merges over the blocks; dbias is a plain sum of dy over the channel. Ours must stay within
    # twice torch's own error against fp64 on the same values (plus samples.ATOL). With the
    # merges in fp32, dweight's error was 1.25-2.11x that bound on 6 of 8 seeds (1.45x on this
    # one); merged in fp64, 0.28-0.52x.
    from samples import assert_close_like_torch
    g = torch.Generator().manual_seed(0)
    shape = (32, 4, 48, 48)
    x = torch.randn(shape, generator=g) + 3.0
    dy = torch.randn(shape, generator=g) + 1.0
    w, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    outs = []
    for F, dtype in ((TF, torch.float32), (NF, torch.float32), (TF, torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        with normkernels.backend("cpp"):
            y = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True)
        outs.append(torch.autograd.grad(y, leaves, dy.to(dtype)))
    for name, t, o, ref in zip(("dx", "dweight", "dbias"), *outs):
        assert_close_like_torch(o, t, ref, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_short_planes_from_inputs_off_their_outputs_alignment_like_torch(dtype):
    # Short NCHW planes take a masked head tile per block where the outputs' spans share one
    # alignment (ShortPlanes::head, set by y or dx); here x and dy are contiguous views one
    # element into their storage, so every load of the aligned tiles is off a vector boundary.
    from samples import assert_close_like_torch
    shape = (6, 64, 7, 7)
    n = torch.Size(shape).numel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 1, generator=g, dtype=torch.float64)[1:].view(shape).to(dtype)
    dy = torch.randn(n + 1, generator=g, dtype=torch.float64)[1:].view(shape).to(dtype)
    if dtype != torch.float64:  # .to() copied them: make them views one element in again
        x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(shape)
        dy = torch.cat([dy.new_zeros(1), dy.flatten()])[1:].view(shape)
    assert x.storage_offset() == 1 and dy.storage_offset() == 1 and x.is_contiguous()
    w = (torch.rand(64, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    rm = torch.randn(64, generator=g, dtype=torch.float64).to(dtype)
    rv = (torch.rand(64, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    results = []
    runs = ((NF.batch_norm, dtype), (TF.batch_norm, dtype), (TF.batch_norm, torch.float64))
    for fn, cast in runs:
        xc, wc = x.to(cast), w.to(cast)  # x itself (one element in) where cast is its dtype
        xg, wg = xc.detach().requires_grad_(), wc.detach().requires_grad_()
        y = fn(xg, None, None, wg, wg, True)
        results.append((y.detach(), *torch.autograd.grad(y, (xg, wg), dy.to(cast)),
                        fn(xc, rm.to(cast), rv.to(cast), wc, wc, False)))
    for what, ours, theirs, ref in zip(("y", "dx", "dweight", "inference y"), *results):
        assert_close_like_torch(ours, theirs, ref, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_short_plane_inference_far_from_zero_within_the_rounding_of_x(dtype):
    # Inference on short NCHW planes folds the running mean into the shift once per channel
    # (y = x * scale + (shift - mean * scale), as ATen's CPU batch norm does). Its extra error is
    # at most half an ulp of mean * scale: the size of x's own rounding where x is near the
    # mean, here 1e3 times the spread (16 samples of 7x7: ShortPlanes' blocks, a partial one).
    g = torch.Generator().manual_seed(0)
    shape, offset = (16, 40, 7, 7), 1e3
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(dtype)
    rm = offset + 0.1 * torch.randn(40, generator=g, dtype=torch.float64)
    rv = torch.rand(40, generator=g, dtype=torch.float64) + 0.5
    w = torch.rand(40, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(40, generator=g, dtype=torch.float64)
    with normkernels.backend("cpp"):
        y = NF.batch_norm(x, rm.to(dtype), rv.to(dtype), w.to(dtype), b.to(dtype), False)
    # the reference from the same (rounded) statistics and parameters, in float64
    ref = TF.batch_norm(x.double(), *(t.to(dtype).double() for t in (rm, rv, w, b)), False)
    scale = (w / (rv + 1e-5).sqrt()).max().item()
    eps = torch.finfo(dtype).eps
    err = (y.double() - ref).abs()
    # x's rounding near the offset, carried by the scale; then y's own rounding
    bound = eps * offset * scale + eps * ref.abs()
    assert (err <= bound).all(), (err - bound).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_planes_same_bits_for_any_thread_count(dtype):
    # The short-plane passes split the channels into blocks (ShortPlanes) whose size is set by
    # max_span, not by the thread count, wherever there are channels enough: with 128 channels of
    # 7x7 the blocks (20 channels forward and inference, 10 backward) are the same for 1 thread
    # and for 8, so every output must be the same bits; the threads only share the blocks out.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 128, 7, 7, generator=g).to(dtype)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    w = (torch.rand(128, generator=g) + 0.5).to(dtype)
    rm, rv = torch.randn(128, generator=g).to(dtype), (torch.rand(128, generator=g) + 0.5).to(dtype)

    def run():
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        with normkernels.backend("cpp"):
            y = NF.batch_norm(xg, None, None, wg, wg, True)
            grads = torch.autograd.grad(y, (xg, wg), dy)
            return (y.detach(), *grads, NF.batch_norm(x, rm, rv, w, w, False))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = run()
        torch.set_num_threads(8)
        for _ in range(5):
            for what, ours, one_thread in zip(("y", "dx", "dweight", "inference y"), run(), ref):
                assert torch.equal(ours, one_thread), what
    finally:
        torch.set_num_threads(threads)


def test_nan_stays_in_its_row_group_and_channel(backend_name):
    x = torch.randn(4, 6, 5)
    x[1, 2, 3] = float("nan")
    y = NF.layer_norm(x, (5,))
    assert torch.isnan(y[1, 2]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    assert torch.isfinite(y[1, [0, 1, 3, 4, 5]]).all()
    y = NF.group_norm(x, 3)  # channels 2,3 are group 1 of sample 1
    assert torch.isnan(y[1, 2:4]).all()
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[1, 2:4] = False
    assert torch.isfinite(y[mask]).all()
    y = NF.batch_norm(x, None, None, training=True)
    assert torch.isnan(y[:, 2]).all()
    assert torch.isfinite(y[:, [0, 1, 3, 4, 5]]).all()
    xc = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.unsqueeze(-1).contiguous(memory_format=torch.channels_last)
    y = NF.group_norm(xc, 3)
    assert torch.isnan(y[1, 2:4]).all() and torch.isfinite(y[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hw", [(2, 2), (3, 3), (2, 5)])
def test_inf_stays_in_its_group_in_the_backward_of_short_planes(hw, dtype, backend_name):
    # The backward's sums of NCHW planes shorter than a chunk load a whole chunk from each plane's
    # start, reading on into the next planes (short_planes_grad_sums); those lanes must count for
    # nothing, even where they hold an inf. Here the planes read past into are the first of
    # group 1 of image 1 and of the last group of the last image (near the tensor's end, where
    # the loads are masked instead): every gradient NaN or finite where torch's is, and close.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, *hw, generator=g).to(dtype)
    x[1, 2, 0, 0] = float("inf")
    x[2, 6, 0, 0] = float("inf")
    dy = torch.randn(x.shape, generator=g).to(dtype)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    grads = {}
    for F in (TF, NF):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        grads[F] = torch.autograd.grad(F.group_norm(xg, 4, wg, bg), (xg, wg, bg), dy)
    for what, ours, theirs in zip(("dx", "dweight", "dbias"), grads[NF], grads[TF]):
        assert torch.equal(ours.isnan(), theirs.isnan()), what
        assert ours.isfinite().sum() > 0, what
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol, equal_nan=True, msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_group_norm_backward_of_short_planes_same_bits_for_any_thread_count(dtype):
    # The threads split the NCHW groups into tasks, and a task's blocks start where it starts; a
    # plane's sums (short_planes_grad_sums: a whole chunk from its start, or masked near the
    # tensor's end) and the sums over images must not depend on where: 37 images of 3x3 maps,
    # 2x2 and 2x5, on 1, 3 and 8 threads, the same bits.
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    try:
        for shape, groups in (((37, 64, 3, 3), 32), ((16, 24, 2, 2), 4), ((9, 40, 2, 5), 8)):
            x = torch.randn(shape, generator=g).to(dtype)
            dy = torch.randn(shape, generator=g).to(dtype)
            w = torch.randn(shape[1], generator=g)
            runs = []
            for n in (1, 3, 8):
                torch.set_num_threads(n)
                xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
                with normkernels.backend("cpp"):
                    y = NF.group_norm(xg, groups, wg, wg)
                    runs.append(torch.autograd.grad(y, (xg, wg), dy))
            for run in runs[1:]:
                for what, ours, one_thread in zip(("dx", "dweight"), run, runs[0]):
                    assert torch.equal(ours, one_thread), (shape, what)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constant_input_gives_zeros(dtype, backend_name):
    x = torch.full((3, 8, 4, 4), 3.7, dtype=dtype)
    for y in (
        NF.layer_norm(x, (4, 4)),
        NF.group_norm(x, 4),
        NF.group_norm(x.contiguous(memory_format=torch.channels_last), 4),
        NF.batch_norm(x, None, None, training=True),
        NF.batch_norm(x.contiguous(memory_format=torch.channels_last), None, None, training=True),
        NF.instance_norm(x),
    ):
        assert torch.isfinite(y).all()
        assert y.float().abs().max() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_values_normalized_alone_give_exact_outputs_and_gradients(dtype, backend_name):
    # A layer norm row or a group of one value is its own mean: its output is exactly the bias
    # whatever x is, its dx and its dweight terms exactly 0. The closed forms (ours for dx, and
    # torch's) leave up to about 1/sqrt(eps) ulps of dy * w there (torch: fp32 dweight 2.7e-5,
    # fp16 outputs an ulp off the bias); ours are exact. A NaN in x still gives NaN where torch's
    # does.
    eps = 1e-6
    calls = {
        "layer_norm (1,)": ((4, 5, 1), lambda F, x, w, b: F.layer_norm(x, (1,), w, b, eps)),
        "group_norm 1x1 maps": ((3, 8, 1, 1), lambda F, x, w, b: F.group_norm(x, 8, w, b, eps)),
        "group_norm (N, C)": ((3, 8), lambda F, x, w, b: F.group_norm(x, 8, w, b, eps)),
    }
    for name, (shape, call) in calls.items():
        channels = 1 if name.startswith("layer") else 8
        bias_shape = (1,) * len(shape) if channels == 1 else (1, 8) + (1,) * (len(shape) - 2)
        for poison in (False, True):
            x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
            if poison:
                x.view(-1)[1] = float("nan")
            w = (torch.rand(channels, dtype=torch.float64) + 0.5).to(dtype)
            b = torch.randn(channels, dtype=torch.float64).to(dtype)
            dy = torch.randn(shape, dtype=torch.float64).to(dtype)
            results = []
            for F in (TF, NF):
                xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
                y = call(F, xr, wr, br)
                results.append((y, *torch.autograd.grad(y, (xr, wr, br), dy)))
            exact = (b.view(bias_shape).expand(shape), torch.zeros(shape, dtype=dtype),
                     torch.zeros(channels, dtype=dtype))
            for what, ref, ours, truth in zip(("y", "dx", "dweight"), results[0], results[1], exact):
                assert torch.equal(ours.isnan(), ref.isnan()), (name, what)
                clean = ~ours.isnan()
                assert torch.equal(ours[clean], truth[clean]), (name, what)
            dims = [d for d in range(len(shape)) if d != (len(shape) - 1 if channels == 1 else 1)]
            dbias = dy.double().sum(dims)  # (a sum of 12-20 values: the dtype's own tolerance)
            tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}.get(dtype, 2e-3)
            torch.testing.assert_close(results[1][3].double(), dbias, rtol=tol, atol=tol)


def test_parameter_dtypes_accepted_and_refused_like_torch():
    # torch's CPU norms take parameters (and batch norm's running statistics) all of one dtype,
    # the input's or fp32 for a half-precision input, and raise RuntimeError otherwise; every
    # combination of input, weight, bias and running-statistics dtype (absent included)
    import itertools

    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, None]

    def full(d, value):
        return None if d is None else torch.full((8,), value, dtype=d)

    def outcome(call):
        try:
            return call().dtype
        except RuntimeError:
            return "raises"

    for xd in dtypes[:4]:
        x = torch.randn(4, 8, 3).to(xd)
        rows = torch.randn(4, 8).to(xd)
        for wd, bd in itertools.product(dtypes, dtypes):
            w, b = full(wd, 1.0), full(bd, 0.0)
            calls = {
                "layer_norm": lambda F: F.layer_norm(rows, (8,), w, b),
                "rms_norm": lambda F: F.rms_norm(rows, (8,), w),
                "group_norm": lambda F: F.group_norm(x, 2, w, b),
                "instance_norm": lambda F: F.instance_norm(x, None, None, w, b),
            }
            for rd in dtypes[:4]:  # instance norm with running statistics, either mode
                if xd in (torch.bfloat16, torch.float16) and wd is None and bd == torch.float32:
                    # torch 2.13 quirk, not copied: with running statistics of any dtype, a
                    # half input with an fp32 bias and no weight raises (without running
                    # statistics, or with an fp32 weight too, it does not)
                    continue
                for use_input_stats in (True, False):
                    calls[f"instance_norm {rd} {use_input_stats}"] = (
                        lambda F, rd=rd, use_input_stats=use_input_stats: F.instance_norm(
                            x, full(rd, 0.0), full(rd, 1.0), w, b, use_input_stats))
            for rd in dtypes:
                for training in (True, False):
                    if rd is None and not training:
                        continue
                    calls[f"batch_norm {rd} {training}"] = (
                        lambda F, rd=rd, training=training: F.batch_norm(
                            x, full(rd, 0.0), full(rd, 1.0), w, b, training))
            for name, call in calls.items():
                expected = outcome(lambda: call(TF))
                if (torch.__version__ < (2, 11) and name.startswith("instance_norm ")
                        and expected == "raises" and outcome(lambda: calls["instance_norm"](TF)) != "raises"):
                    # torch before 2.11 refused running statistics whose dtype its batch norm
                    # would refuse as parameters; from 2.11 they are accepted wherever the
                    # weight and bias are, and y has the input's dtype. We do as 2.11 (checked
                    # against 2.6, 2.7 and 2.10 over this whole table).
                    expected = xd
                with normkernels.backend("cpp"):
                    got = outcome(lambda: call(NF))
                assert got == expected, (name, xd, wd, bd, got, expected)


def test_mixed_dtype_params_like_torch(backend_name):
    # bf16 activations with fp32 parameters and running statistics (autocast-style models)
    x = torch.randn(4, 6, 5, 5).to(torch.bfloat16)
    w, b = torch.randn(6), torch.randn(6)
    rm_t, rv_t = torch.zeros(6), torch.ones(6)
    rm_o, rv_o = rm_t.clone(), rv_t.clone()
    y_t = TF.batch_norm(x, rm_t, rv_t, w, b, training=True)
    y_o = NF.batch_norm(x, rm_o, rv_o, w, b, training=True)
    assert y_o.dtype == y_t.dtype
    torch.testing.assert_close(y_o.float(), y_t.float(), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(rm_o, rm_t)
    torch.testing.assert_close(rv_o, rv_t, atol=1e-3, rtol=1e-3)
    y_t = TF.layer_norm(x, (5,), torch.randn(5), None)
    assert NF.layer_norm(x, (5,), torch.randn(5), None).dtype == y_t.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_rms_norm_default_eps_like_torch(dtype, backend_name):
    x = (torch.randn(4, 16) * 1e-4).to(dtype)
    torch.testing.assert_close(NF.rms_norm(x, [16]), TF.rms_norm(x, [16]))


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32),
                                              (torch.float16, torch.bfloat16),
                                              (torch.float32, torch.float64),
                                              (torch.bfloat16, None)])
def test_rms_norm_as_torch_2_6_did(monkeypatch, x_dtype, w_dtype, backend_name):
    # On torch < 2.7 (a composite rms_norm there) y takes the promoted dtype and eps=None the
    # input dtype's epsilon (the whole dtype table is checked against the installed torch by
    # test_parameter_dtypes_accepted_and_refused_like_torch); here that path runs on any torch,
    # against the same computed in the promoted dtype, gradients included.
    import normkernels.functional as functional

    monkeypatch.setattr(functional, "_RMS_NORM_COMPOSITE", True)
    x = (torch.randn(4, 16) * 0.05).to(x_dtype).requires_grad_()
    w = None if w_dtype is None else (torch.rand(16) + 0.5).to(w_dtype).requires_grad_()
    dtype = x_dtype if w is None else torch.result_type(x, w)
    y = NF.rms_norm(x, [16], w)
    assert y.dtype == dtype
    x_ref = x.detach().to(dtype).requires_grad_()
    w_ref = None if w is None else w.detach().to(dtype).requires_grad_()
    y_ref = TF.rms_norm(x_ref, [16], w_ref, eps=torch.finfo(x_dtype).eps)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in (x, w) if t is not None], dy)
    grads_ref = torch.autograd.grad(y_ref, [t for t in (x_ref, w_ref) if t is not None], dy)
    assert [g.dtype for g in grads] == [t.dtype for t in (x, w) if t is not None]
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref.to(g.dtype))


def test_empty_batch_like_torch(backend_name):
    for fn in (
        lambda F, x: F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True),
        lambda F, x: F.group_norm(x, 3),
        lambda F, x: F.layer_norm(x, (4, 4)),
    ):
        x_t = torch.randn(0, 3, 4, 4, requires_grad=True)
        x_o = x_t.detach().clone().requires_grad_()
        y_t, y_o = fn(TF, x_t), fn(NF, x_o)
        assert y_o.shape == y_t.shape
        y_o.sum().backward()
        assert x_o.grad.shape == x_o.shape
    rm, rv = torch.zeros(3), torch.ones(3)
    NF.batch_norm(torch.randn(0, 3, 2, 2), rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_empty_maps_like_torch(backend_name):
    """Groups of no values (a spatial size of 0): the statistics, outputs and every gradient as
    torch's, and no kernel reads a value that is not there (the C++ small-group path once read a
    group's first value). torch's rstd there is NaN (the variance of nothing), and so its dweight
    (that rstd times sums of nothing); the Triton forward once gave 1/sqrt(eps), and dweight 0."""
    for shape in ((2, 4, 0, 3), (2, 4, 0), (3, 4, 0, 1)):
        x = torch.randn(shape)
        want = torch.ops.aten.native_group_norm(x, None, None, shape[0], 4, 0, 2, 1e-5)[1:]
        got = torch.ops.normkernels.group_norm_fwd(x, 2, None, None, 1e-5)[1:]
        for name, g, w in zip(("mean", "rstd"), got, want):
            torch.testing.assert_close(g.reshape(w.shape), w, equal_nan=True, msg=name)
        outs = []
        for F in (TF, NF):
            x = torch.randn(shape, requires_grad=True)
            w = torch.ones(4, requires_grad=True)
            b = torch.zeros(4, requires_grad=True)
            y = F.group_norm(x, 2, w, b)
            outs.append([y] + list(torch.autograd.grad(y, (x, w, b), torch.randn_like(y))))
        names = ("y", "dx", "dweight", "dbias")
        for name, got, want in zip(names, outs[1], outs[0]):
            torch.testing.assert_close(got, want, equal_nan=True, msg=name)


def test_one_element_per_group_and_long_rows(backend_name):
    x = torch.randn(2, 6, 1, 1)
    torch.testing.assert_close(NF.group_norm(x, 6), TF.group_norm(x, 6))  # zeros, one element
    x = torch.randn(3, 70001)  # a row far longer than one SIMD chunk, odd length
    torch.testing.assert_close(NF.layer_norm(x, (70001,)), TF.layer_norm(x, (70001,)))


def _assert_layer_norm_rows_like_torch(dtype, rows, n, param_dtype, rms):
    """y and every gradient of our C++ layer/RMS norm, rows of `n` in `dtype`, judged against the
    same computed in fp64 from the same values, by torch's own error there (samples.
    assert_close_like_torch): for short fp16 rows torch's dx is itself off by up to 18 on some
    inputs, so a tolerance around torch's result would judge torch, not us."""
    from samples import assert_close_like_torch

    x = torch.randn(rows, n).to(dtype)
    w = (torch.rand(n) + 0.5).to(param_dtype)
    b = None if rms else torch.randn(n).to(param_dtype)
    dy = torch.randn(rows, n).to(dtype)
    outs = []
    for F, cast in ((TF, None), (NF, None), (TF, torch.float64)):
        inputs = (x, w) + (() if rms else (b,))
        leaves = [(t if cast is None else t.to(cast)).clone().requires_grad_() for t in inputs]
        with normkernels.backend("cpp"):
            y = F.rms_norm(leaves[0], (n,), leaves[1]) if rms else F.layer_norm(leaves[0], (n,), *leaves[1:])
        grads = torch.autograd.grad(y, leaves, dy if cast is None else dy.to(cast))
        outs.append([y] + list(grads))
    for name, t, o, ref in zip(("y", "dx", "dw", "db"), *outs):
        assert_close_like_torch(o, t, ref, f"{name} ({rows}x{n} {dtype})")


@pytest.mark.parametrize(
    "rows, n, param_dtype, rms",
    [
        (3, 100, torch.float32, False),  # fp32 parameters, copied into the kernel's lane order
        (3, 100, torch.bfloat16, False),  # bf16 parameters widened in registers, in that order
        # as many rows as a thread's fp16 parameters are copied from: bf16 ones still widen in
        # registers
        (6, 100, torch.bfloat16, False),
        (6, 100, torch.bfloat16, True),
        (2, 16384 + 35, torch.bfloat16, False),  # rows too long to widen into a scratch row
        (2, 16384 + 35, torch.float32, True),
        (300, 100, torch.bfloat16, False),  # several blocks' partials summed into bf16 dw/db
    ],
)
def test_layer_norm_bf16_every_parameter_path_like_torch(rows, n, param_dtype, rms):
    # bf16 rows are loaded even/odd under AVX-512 and AVX2; every way the parameters reach
    # the kernel must meet them in the same order (a mismatch shuffles the affine transform)
    _assert_layer_norm_rows_like_torch(torch.bfloat16, rows, n, param_dtype, rms)


@pytest.mark.parametrize("n", [5, 16, 20, 32, 48, 64, 96, 100, 128, 16 * 9 + 7, 160])
@pytest.mark.parametrize("dtype, param_dtype", [(torch.float32, torch.float32),
                                                (torch.float64, torch.float64),
                                                (torch.float16, torch.float16),
                                                (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("rms", [False, True])
def test_layer_norm_short_rows_and_tails_like_torch(n, dtype, param_dtype, rms):
    # rows of one to four whole chunks (32 values under AVX-512, 16 under AVX2) are loaded once
    # into registers (layer_norm_fwd_register_rows); 160 is five, read from memory. The columns
    # past a row's last whole chunk (all of a row shorter than one: 5, 20, and 16 under AVX-512)
    # are one masked chunk in the normalize, dweight/dbias and dx passes, in natural order where
    # bf16 chunks are even/odd: their weight, bias and partials must meet them there
    _assert_layer_norm_rows_like_torch(dtype, 37, n, param_dtype, rms)


@pytest.mark.parametrize("n", [32, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_bias_without_weight_like_torch(n, dtype):
    from samples import assert_close_like_torch

    x = torch.randn(9, n).to(dtype)
    b = torch.randn(n).to(dtype)
    with normkernels.backend("cpp"):
        y = NF.layer_norm(x, (n,), None, b)
    ref = TF.layer_norm(x.double(), (n,), None, b.double())
    assert_close_like_torch(y, TF.layer_norm(x, (n,), None, b), ref, f"y ({n} {dtype})")


@pytest.mark.parametrize("dtype, param_dtype", [(torch.float16, torch.float16),
                                                (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
def test_layer_norm_threads_copy_their_own_parameters_like_torch(dtype, param_dtype):
    # Each thread widens or reorders weight and bias into a copy of its own where it copies them
    # at all (params_copied in layer_norm.cpp: fp16 ones from 4 rows a thread, fp32 ones for
    # bf16's lane order), and the backward's threads zero the partial sums they add into. 700
    # rows of 100 are one task on one thread and three on eight: y and dx, row by row, must be
    # the same bits either way; dweight and dbias (summed in blocks set by the thread count, as
    # torch's) the same bits from run to run, and like torch's.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(700, 100, generator=g).to(dtype)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    w = (torch.rand(100, generator=g) + 0.5).to(param_dtype)
    b = torch.randn(100, generator=g).to(param_dtype)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        with normkernels.backend("cpp"):
            y = NF.layer_norm(leaves[0], (100,), leaves[1], leaves[2])
            return (y.detach(), *torch.autograd.grad(y, leaves, dy))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = run()
        torch.set_num_threads(8)
        first = run()
        for what, ours, one_thread in zip(("y", "dx"), first, ref):
            assert torch.equal(ours, one_thread), what
        for what, ours, again in zip(("dweight", "dbias"), first[2:], run()[2:]):
            assert torch.equal(ours, again), what
        _assert_layer_norm_rows_like_torch(dtype, 700, 100, param_dtype, rms=False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True])
def test_layer_norm_long_rows_swept_several_at_once_like_torch(dtype, rms):
    # the backward's first pass takes rows longer than 1365 several at a time (two under AVX2,
    # four otherwise) and a block's last rows, too few for a sweep, one by one: 7 rows are one
    # block, swept 2+2+2+1 or 4+1+1+1
    _assert_layer_norm_rows_like_torch(dtype, 7, 1403, dtype, rms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_norm_param_grads_in_every_weight_dtype_like_torch(dtype):
    # the backward reads a weight of x's dtype as it is and writes dweight/dbias in x's dtype
    # itself; other weight dtypes, and strided weights, go through fp32 copies. Each way returns
    # what torch returns, in the parameter's dtype.
    x = torch.randn(5, 40).to(dtype)
    dy = torch.randn(5, 40).to(dtype)
    for param_dtype in (dtype, torch.float32):  # the pairs torch accepts
        for strided in (False, True):
            w_full = (torch.rand(80) + 0.5).to(param_dtype)
            w = w_full[::2] if strided else w_full[:40]
            b = torch.randn(40).to(param_dtype)
            grads = []
            for F in (TF, NF):
                leaves = [x.clone().requires_grad_(), w.clone().requires_grad_() if not strided
                          else w_full.clone().requires_grad_(), b.clone().requires_grad_()]
                wl = leaves[1][::2] if strided else leaves[1]
                with normkernels.backend("cpp"):
                    y = F.layer_norm(leaves[0], (40,), wl, leaves[2])
                grads.append(torch.autograd.grad(y, leaves, dy))
            for name, t, o in zip(("dx", "dw", "db"), *grads):
                assert o.dtype == t.dtype and o.shape == t.shape, (name, param_dtype, strided)
                tol = 1e-4 if o.dtype in (torch.float32, torch.float64) and dtype == torch.float32 else 6e-2
                torch.testing.assert_close(o.double(), t.double(), atol=tol, rtol=tol,
                                           msg=f"{name} {dtype} weight {param_dtype} strided={strided}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_partial_chunk_length_like_torch(dtype):
    # rows of 1..40 end in every partial chunk (loaded and stored masked, or in pieces under
    # AVX2) after zero, one or two whole ones; channels_last rows of 1..40 channels the same
    # through the column kernels' masked tiles (and 63-65 channels: a row of exactly one fp32
    # register tile under AVX-512, normalized with its coefficients held in registers)
    tol = {torch.float64: 1e-7, torch.float32: 1e-4}.get(dtype, 5e-2)
    for n in list(range(1, 41)) + [63, 64, 65]:
        _assert_layer_norm_rows_like_torch(dtype, 3, n, dtype, False)
        x = torch.randn(2, n, 3, 5).to(dtype).contiguous(memory_format=torch.channels_last)
        w, b = (torch.rand(n) + 0.5).to(dtype), torch.randn(n).to(dtype)
        rm, rv = torch.randn(n).to(dtype), (torch.rand(n) + 0.5).to(dtype)
        with normkernels.backend("cpp"):
            ours = NF.group_norm(x, 1, w, b)
            ours_bn = NF.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
        torch.testing.assert_close(ours, TF.group_norm(x, 1, w, b), atol=tol, rtol=tol, msg=f"{n}")
        torch.testing.assert_close(ours_bn, TF.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5),
                                   atol=tol, rtol=tol, msg=f"{n}")


def test_bf16_nan_stays_nan():
    # bf16 results are rounded by the kernels' own conversion under AVX2/AVX-512: NaN must stay NaN
    x = torch.randn(4, 100).to(torch.bfloat16)
    x[1, 37] = float("nan")
    with normkernels.backend("cpp"):
        y = NF.layer_norm(x, (100,))
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()


def _fp32_nan(bits):
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0]


# fp32 NaNs by their bits: the default and a quiet one, then payloads in the low half, which the
# AVX2 bf16 rounding carries into the upper half unless it tests for NaN (0x7FFFFFFF -> -0.0,
# 0xFFFFFFFF -> +0.0, 0x7F800001 -> inf): the kernels skip that test only where no fp32 operand
# holds one.
@pytest.mark.parametrize("bits", [0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FFF8001])
@pytest.mark.parametrize("where", ["weight", "bias", "running_var"])
def test_bf16_results_of_nan_parameters_are_nan_where_torch_s_are(bits, where):
    nan = _fp32_nan(bits)
    assert torch.isnan(nan)
    gen = torch.Generator().manual_seed(bits % 1000)
    cases = []  # (name, function of (x, w, b, rm, rv), x shape, channels, channels_last)
    cases.append(("layer_norm", lambda f, x, w, b, rm, rv: f.layer_norm(x, (40,), w, b), (6, 40), 40, False))
    for shape in ((2, 4, 6, 6), (2, 4, 16, 16), (3, 48, 4, 4)):
        for cl in (False, True):
            cases.append(("batch_norm infer", lambda f, x, w, b, rm, rv: f.batch_norm(x, rm, rv, w, b, False), shape, shape[1], cl))
            cases.append(("batch_norm train", lambda f, x, w, b, rm, rv: f.batch_norm(x, None, None, w, b, True), shape, shape[1], cl))
            cases.append(("group_norm", lambda f, x, w, b, rm, rv: f.group_norm(x, 2, w, b), shape, shape[1], cl))
    for name, fn, shape, C, cl in cases:
        if where == "running_var" and name != "batch_norm infer":
            continue
        x = torch.randn(shape, generator=gen).to(torch.bfloat16)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(shape, generator=gen).to(torch.bfloat16)
        params = {"weight": torch.rand(C, generator=gen) + 0.5, "bias": torch.randn(C, generator=gen),
                  "running_var": torch.rand(C, generator=gen) + 0.5}
        params[where][C // 3] = nan
        rm = torch.randn(C, generator=gen)
        results = []
        for f in (NF, TF):
            xg = x.detach().clone().requires_grad_()
            with normkernels.backend("cpp"):
                y = fn(f, xg, params["weight"], params["bias"], rm, params["running_var"])
                y.backward(dy)
            results.append((y, xg.grad))
        msg = f"{name} {tuple(shape)} channels_last={cl} {where} NaN {bits:#x}"
        assert torch.isnan(results[1][0]).any(), msg  # the output has NaNs (dx may not: bias)
        for ours, ref in zip(*results):
            assert torch.equal(torch.isnan(ours), torch.isnan(ref)), msg


@pytest.mark.parametrize("n", [100, 4096, 4096 + 35])
@pytest.mark.parametrize("rms", [False, True])
def test_layer_norm_fp16_rows_widened_or_read_in_place_like_torch(n, rms):
    # fp16 rows up to 4096 are widened into a scratch row, longer ones read in place
    _assert_layer_norm_rows_like_torch(torch.float16, 3, n, torch.float16, rms)


def test_functional_signatures_match_torch():
    import inspect

    for name in ("layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm"):
        ours = inspect.signature(getattr(NF, name))
        theirs = inspect.signature(getattr(TF, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        for p in theirs.parameters.values():
            assert ours.parameters[p.name].default == p.default, (name, p.name)


def _script_calls():
    """(functional name, args) for every functional but sync_batch_norm (torch.distributed is
    not scriptable); batch and instance norm update their running statistics in the calls that
    train."""
    x, w, b = torch.randn(3, 6, 4, 5), torch.rand(6) + 0.5, torch.randn(6)
    rm, rv = torch.randn(6) * 0.1, torch.rand(6) + 0.5
    return [
        ("layer_norm", (x, [4, 5], torch.randn(4, 5), torch.randn(4, 5), 1e-5)),
        ("layer_norm", (x.to(torch.bfloat16), [5], None, None, 1e-3)),
        ("rms_norm", (x, [5], torch.randn(5), None)),
        ("rms_norm", (x.double(), [4, 5], None, 1e-6)),
        ("group_norm", (x.contiguous(memory_format=torch.channels_last), 3, w, b, 1e-5)),
        ("batch_norm", (x, rm, rv, w, b, True, 0.1, 1e-5)),
        ("batch_norm", (x, rm, rv, w, b, False, 0.1, 1e-5)),
        ("batch_norm", (x, None, None, None, None, True, 0.1, 1e-5)),
        ("instance_norm", (x, rm, rv, w, b, True, 0.1, 1e-5)),
        ("instance_norm", (x, rm, rv, None, None, False, 0.1, 1e-5)),
    ]


@pytest.mark.filterwarnings("ignore:`torch.jit.")
@pytest.mark.parametrize("name,args", [pytest.param(n, a, id=f"{n}-{i}") for i, (n, a) in enumerate(_script_calls())])
def test_functionals_compile_with_torchscript_like_torchs(name, args):
    """torch.jit.script compiles each functional, as it compiles torch.nn.functional's; the
    compiled one calls our op (no ATen norm op) and gives what torch's compiled one gives,
    running statistics included."""
    ours, theirs = torch.jit.script(getattr(NF, name)), torch.jit.script(getattr(TF, name))
    graph = str(ours.graph)
    assert "normkernels::" in graph and "aten::" + name not in graph
    ours_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    theirs_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    torch.testing.assert_close(ours(*ours_args), theirs(*theirs_args))
    for a, b in zip(ours_args, theirs_args):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b)  # the running statistics, updated in place
    assert NF._machine_eps(torch.float64) == torch.finfo(torch.float64).eps
    assert NF._machine_eps(torch.bfloat16) == torch.finfo(torch.float32).eps


class _FunctionRecorder(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,args", [pytest.param(n, a, id=f"{n}-{i}") for i, (n, a) in enumerate(_script_calls())])
def test_functionals_dispatch_torch_function_like_torchs(name, args):
    """Each functional hands a call with a tensor subclass, a proxy or under a torch function
    mode to __torch_function__, as torch's do: torch.fx traces it as one call_function node of
    ours (that runs with torch's results), and a mode sees our function."""
    x, rest = args[0], args[1:]

    def call(fn, x):
        return fn(x, *[a.clone() if isinstance(a, torch.Tensor) else a for a in rest])

    class Model(torch.nn.Module):
        def forward(self, x):
            return call(getattr(NF, name), x)

    traced = torch.fx.symbolic_trace(Model())
    functions = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert functions == [getattr(NF, name)]
    torch.testing.assert_close(traced(x), call(getattr(TF, name), x))
    cloned = [a.clone() if isinstance(a, torch.Tensor) else a for a in rest]
    with _FunctionRecorder() as recorder:
        getattr(NF, name)(x, *cloned)
    assert recorder.funcs[0] is getattr(NF, name)


@pytest.mark.filterwarnings("ignore:`torch.jit.")
def test_scripted_functionals_check_their_arguments():
    """Under TorchScript the ops' own checks explain bad arguments (RuntimeError), and the errors
    functional raises itself keep their messages (TorchScript raises those as torch.jit.Error,
    as it does torch's own)."""
    bn = torch.jit.script(NF.batch_norm)
    with pytest.raises(RuntimeError, match="batch_norm: expected weight of shape"):
        bn(torch.randn(2, 4, 3), None, None, torch.ones(3), None, True, 0.1, 1e-5)
    with pytest.raises(torch.jit.Error, match="running_mean and running_var must be given"):
        bn(torch.randn(2, 4, 3), None, None, None, None, False, 0.1, 1e-5)
    with pytest.raises(torch.jit.Error, match="Expected more than 1 value per channel"):
        bn(torch.randn(1, 4), None, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="layer_norm: expected weight of shape"):
        torch.jit.script(NF.layer_norm)(torch.randn(2, 3), [3], torch.ones(4), None, 1e-5)
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        torch.jit.script(NF.group_norm)(torch.randn(2, 4, 3), 3, None, None, 1e-5)
    with pytest.raises(torch.jit.Error, match="expected at least 2 dimensions"):
        torch.jit.script(NF.instance_norm)(torch.randn(4), None, None, None, None, True, 0.1, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_channels_last_in_chunks_of_images_like_torch(dtype):
    # 8 MiB fp32 images of 2-channel groups (no stripes): the forward walks them two images a
    # chunk and the backward one a chunk (16 MiB of inputs each, ImageChunks), bf16 three (one
    # chunk) and two: every image's statistics and gradients must match torch's, in one piece.
    from samples import assert_close_like_torch

    g = torch.Generator().manual_seed(0)
    shape = (3, 64, 256, 128)
    x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.rand(64, generator=g) + 0.5).to(dtype)
    b = torch.randn(64, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    outs = {}
    for name, F, cast in (("torch", TF, None), ("ours", NF, None), ("ref", TF, torch.float64)):
        leaves = [(t.to(cast) if cast else t).clone().requires_grad_() for t in (x, w, b)]
        with normkernels.backend("cpp"):
            y = F.group_norm(leaves[0], 32, leaves[1], leaves[2])
        grads = torch.autograd.grad(y, leaves, dy.to(cast) if cast else dy)
        outs[name] = [y] + list(grads)
    for what, ours, theirs, ref in zip(("y", "dx", "dw", "db"), outs["ours"], outs["torch"], outs["ref"]):
        assert_close_like_torch(ours, theirs, ref, what)


def test_running_stats_requiring_grad_refused_like_torch(backend_name):
    # torch's running statistics are not differentiable inputs: one that requires grad raises
    # while grad mode is on (training or not), and is updated as usual under no_grad
    calls = {
        "batch_norm train": lambda F, rm, rv: F.batch_norm(torch.randn(4, 3, 2), rm, rv, training=True),
        "batch_norm eval": lambda F, rm, rv: F.batch_norm(torch.randn(4, 3, 2), rm, rv),
        "instance_norm": lambda F, rm, rv: F.instance_norm(torch.randn(4, 3, 2), rm, rv),
    }
    for name, call in calls.items():
        for which in (0, 1):
            stats = [torch.zeros(3), torch.ones(3)]
            stats[which].requires_grad_()
            with pytest.raises(RuntimeError) as theirs:
                call(TF, *stats)
            with pytest.raises(RuntimeError, match="not differentiable with respect to argument") as ours:
                call(NF, *stats)
            assert ("running_mean", "running_var")[which] in str(theirs.value), theirs.value
            assert ("running_mean", "running_var")[which] in str(ours.value), name
            with torch.no_grad():
                ours_stats = [t.clone() for t in stats]
                torch.manual_seed(0)
                y_t = call(TF, *stats)
                torch.manual_seed(0)
                y_o = call(NF, *ours_stats)
            torch.testing.assert_close(y_o, y_t)
            for a, b in zip(ours_stats, stats):
                torch.testing.assert_close(a, b)


_AUTOCAST_CALLS = {  # name: (call, whether torch's CUDA autocast runs it in fp32)
    "layer_norm": (lambda F, x, w, b: F.layer_norm(x, (6,), w, b), True),
    "rms_norm": (lambda F, x, w, b: F.rms_norm(x, (6,), w), False),
    "group_norm": (lambda F, x, w, b: F.group_norm(x.unflatten(1, (6, 1)), 3, w, b), True),
    "instance_norm": (lambda F, x, w, b: F.instance_norm(x.unflatten(0, (1, 5)).transpose(1, 2), weight=w, bias=b), False),
    "batch_norm": (lambda F, x, w, b: F.batch_norm(x, None, None, w, b, training=True), False),
}


@pytest.mark.parametrize("name", list(_AUTOCAST_CALLS))
def test_autocast_policy_of_torch_cuda_applied(monkeypatch, name):
    # torch's CUDA autocast runs layer_norm and group_norm in fp32 (the others keep the input's
    # dtype); functional applies that policy itself. Here it runs on CPU tensors, with "cpu"
    # standing for "cuda" (the CPU fast path, which never sees CUDA tensors, stepped around),
    # against torch's functional on the fp32 casts; test_triton checks it against torch on a GPU.
    import normkernels.functional as functional

    monkeypatch.setattr(functional, "_AUTOCAST_FP32_DEVICES", ("cpu",))
    monkeypatch.setattr(functional, "_is_compiling", lambda: True)
    call, fp32 = _AUTOCAST_CALLS[name]
    torch.manual_seed(0)
    x = torch.randn(5, 6).to(torch.bfloat16).requires_grad_()
    w, b = torch.rand(6, requires_grad=True), torch.randn(6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call(NF, x, w, b)
    x_ref = (x.detach().float() if fp32 else x.detach()).requires_grad_()
    w_ref, b_ref = (t.detach().clone().requires_grad_() for t in (w, b))
    y_ref = call(TF, x_ref, w_ref, b_ref)  # (torch 2.6's rms_norm: fp32, promoted by the weight)
    assert y.dtype == y_ref.dtype and (y.dtype == torch.float32 or not fp32)
    # (torch 2.6's composite rms_norm rounds to bf16 on the way, so half-input results get
    # bf16's tolerance)
    torch.testing.assert_close(y, y_ref, **({} if fp32 else dict(atol=1e-2, rtol=1e-2)))
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, (x_ref, w_ref, b_ref), dy.to(y_ref.dtype), allow_unused=True)
    assert grads[0].dtype == torch.bfloat16
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is not None:
            torch.testing.assert_close(g, g_ref.to(g.dtype), atol=2e-2, rtol=2e-2)
