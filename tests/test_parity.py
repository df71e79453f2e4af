"""Every module against torch.nn on identical inputs and state: outputs, every gradient and every
buffer, over two steps in train mode and two in eval mode; all dtypes and layouts."""
import io

import pytest
import torch
from torch import nn

import normkernels
from samples import ATEN_NORM_OPS, DTYPES, Case, all_case_params, assert_close_like_torch, make_input, triple


def _run(module, x, dy):
    """Forward, then gradients of (y * dy).sum() w.r.t. x and every parameter."""
    params = [p for p in module.parameters() if p.requires_grad]
    y = module(x)
    grads = torch.autograd.grad(y, [x] + params, dy, allow_unused=True)
    return y, grads


def _incoming_grad(shape, step, dtype, layout, device="cpu"):
    if step == 0:
        if layout == "strided":
            return make_input(shape, "strided", dtype, device=device)  # a strided dy as well
        return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    # an expanded gradient (stride 0 on every dim but the last), as `(y * w).sum()` produces
    return torch.randn(shape[-1], dtype=torch.float64).to(device=device, dtype=dtype).expand(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case,layout", all_case_params())
def test_module_matches_torch(case, layout, dtype, backend_name):
    _check_matches_torch(triple(case, dtype), case, layout, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case,layout", all_case_params())
def test_module_matches_torch_on_cuda(case, layout, dtype):
    """The same checks on CUDA tensors, against torch's CUDA kernels: the Triton kernels compiled
    for the GPU (the interpreter runs them on CPU tensors elsewhere), and they did run."""
    from normkernels.triton import LAUNCHES

    before = sum(LAUNCHES.values())
    _check_matches_torch(triple(case, dtype, "cuda"), case, layout, dtype, "cuda")
    assert sum(LAUNCHES.values()) > before


def _check_matches_torch(mods, case, layout, dtype, device="cpu"):
    for mode in ("train", "eval"):
        for m in mods.values():
            m.train(mode == "train")
        for step in range(2):
            x = make_input(case.shape, layout, dtype, scale=2.0, shift=0.5, device=device)
            dy = _incoming_grad(case.shape, step, dtype, layout, device)
            x_t = x.detach().requires_grad_()
            try:
                y_t, g_t = _run(mods["torch"], x_t, dy)
            except RuntimeError as e:  # torch itself lacks this CPU kernel
                if "not implemented" in str(e):
                    pytest.skip(f"torch has no CPU kernel here: {e}")
                raise
            x_o = x.detach().requires_grad_()
            y_o, g_o = _run(mods["ours"], x_o, dy)
            x_r = x.detach().double().requires_grad_()
            y_r, g_r = _run(mods["ref"], x_r, dy.double())

            where = f"{mode} step {step}"
            assert_close_like_torch(y_o, y_t, y_r, f"output ({where})")
            if layout == "channels_last":
                fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
                if case.name.startswith("InstanceNorm") or device == "cuda":
                    # Deliberate: torch's instance norm reshapes through batch norm and returns a
                    # contiguous tensor, as its CUDA group norm does (it makes the input
                    # contiguous). Ours keeps the input's channels_last (no hidden copy).
                    assert y_o.is_contiguous(memory_format=fmt)
                else:
                    assert y_o.is_contiguous(memory_format=fmt) == y_t.is_contiguous(memory_format=fmt)
            names = ["input"] + [n for n, p in mods["torch"].named_parameters() if p.requires_grad]
            for name, a, b, r in zip(names, g_o, g_t, g_r):
                assert (a is None) == (b is None), f"grad of {name} ({where})"
                if a is not None:
                    assert_close_like_torch(a, b, r, f"grad of {name} ({where})")
            buffers_t = dict(mods["torch"].named_buffers())
            buffers_r = dict(mods["ref"].named_buffers())
            for name, buf in mods["ours"].named_buffers():
                if buf.dtype == torch.long:
                    assert torch.equal(buf, buffers_t[name]), f"{name} ({where})"
                else:
                    assert_close_like_torch(buf, buffers_t[name], buffers_r[name], f"{name} ({where})")


# Shapes for the C++ kernels only, too big for the Triton interpreter: channels_last shapes whose
# second pass (normalize, dx) a thread walks back to front in several segments, some crossing an
# image boundary (for_rows_back_to_front: 256 KB of input a segment, here 256-1024 rows of 1728 by
# dtype), folded rows of few channels, and short planes of many channels.
CPP_CASES = [
    Case("GroupNorm-segments", lambda: nn.GroupNorm(4, 128), (3, 128, 24, 24), ["channels_last"]),
    Case("InstanceNorm-segments", lambda: nn.InstanceNorm2d(128, affine=True), (3, 128, 24, 24),
         ["channels_last"]),
    Case("BatchNorm-segments", lambda: nn.BatchNorm2d(128), (3, 128, 24, 24), ["channels_last"]),
    # channels_last pixels of few channels, walked several to a row (PixelRows; counts for
    # AVX-512 fp32, whose rows take 64 values or more): 3 channels of 64x128 go 32 pixels (96
    # values) a row, 256 rows an image in four blocks; 6 channels in 3 groups of 50x50 go 20
    # pixels a row, each group's statistics merged from 40 positions
    Case("InstanceNorm-pixelrows", lambda: nn.InstanceNorm2d(3, affine=True), (2, 3, 64, 128),
         ["channels_last"]),
    Case("GroupNorm-pixelrows", lambda: nn.GroupNorm(3, 6), (3, 6, 50, 50), ["channels_last"]),
    # batches of small channels_last images, one task per image for both passes (ImageTasks,
    # with two threads): one group of 32 channels, 512 rows an image in four blocks; 3 channels,
    # 128 rows in two blocks
    Case("GroupNorm-imagetasks", lambda: nn.GroupNorm(1, 32), (8, 32, 32, 32), ["channels_last"]),
    Case("InstanceNorm-imagetasks", lambda: nn.InstanceNorm2d(3, affine=True), (8, 3, 64, 64),
         ["channels_last"]),
    # one image a thread past the L2 budget (fp32: 576 KB of x an image, 1.1 MB of x and dy):
    # one task per image too, its second pass back to front in three segments
    Case("GroupNorm-imagetasks-past-l2", lambda: nn.GroupNorm(8, 64), (2, 64, 48, 48),
         ["channels_last"]),
    # short NCHW planes whose samples' spans share one alignment (64 channels of 7x7: every
    # sample 3136 values apart): blocks of 20 channels (10 in the backward) start mid-vector, so
    # each walks a masked head tile before its aligned whole tiles (ShortPlanes::head), in every
    # dtype; strided: x and dy made contiguous by the kernels' callers
    Case("BatchNorm-shortplanes-aligned", lambda: nn.BatchNorm2d(64), (6, 64, 7, 7),
         ["contiguous", "strided"]),
    # NCHW planes shorter than a chunk: each group's planes one run (ShortPlaneRuns), the weight
    # and bias per element, the backward's per-plane sums a chunk a plane (16-bit planes of four
    # values or more, fp32 of seven: short_planes_grad_sums), the shortest in scalar code: 6
    # channels of 3x3 a group (54 values: masked head or tail, whole chunks between), 8 of 2x2
    # (32), 3 of 1x1 (3: one masked chunk); without affine too
    Case("GroupNorm-shortplane-runs", lambda: nn.GroupNorm(4, 24), (3, 24, 3, 3),
         ["contiguous", "strided"]),
    Case("GroupNorm-shortplane-runs-2x2", lambda: nn.GroupNorm(8, 64), (4, 64, 2, 2)),
    Case("GroupNorm-shortplane-runs-1x1", lambda: nn.GroupNorm(5, 15), (6, 15, 1, 1),
         ["contiguous"]),
    Case("GroupNorm-shortplane-runs-noaffine", lambda: nn.GroupNorm(4, 24, affine=False),
         (3, 24, 2, 3), ["contiguous"]),
    # 1x7 maps: the backward's sums a chunk a plane in every dtype (fp64's chunk is 8 values)
    Case("GroupNorm-shortplane-runs-1x7", lambda: nn.GroupNorm(4, 16), (3, 16, 1, 7),
         ["contiguous"]),
    # groups shorter than a chunk, in scalar code (short_groups): two values (1x1 maps, walked
    # as NCHW planes of one value), 2 channels of 2x2 (8; channels_last takes its own walk),
    # 2 of 1x3 without affine (6)
    Case("GroupNorm-short-groups-1x1", lambda: nn.GroupNorm(32, 64), (16, 64, 1, 1),
         ["contiguous"]),
    Case("GroupNorm-short-groups-2x2", lambda: nn.GroupNorm(8, 16), (5, 16, 2, 2),
         ["contiguous", "channels_last", "strided"]),
    Case("GroupNorm-short-groups-noaffine", lambda: nn.GroupNorm(6, 12, affine=False),
         (4, 12, 1, 3), ["contiguous"]),
    # bf16 planes of a chunk or more ending in a masked one: a group's 8 planes of 7x7 as one run
    # of chunks across their boundaries (planes_as_run); other dtypes walk them one by one
    Case("GroupNorm-plane-run", lambda: nn.GroupNorm(8, 64), (3, 64, 7, 7)),
    # planes of a few chunks as one run per group with per-element weights (group_runs: batches
    # of 32 images or more forward, 16 backward, four planes a group or more): 4x4 (one fp32
    # chunk: the forward, and the 16-bit backward), 10x10 (200 bf16 bytes: the 16-bit backward's
    # dx as a run; fp32 and fp64 planes walk vector by vector, as below)
    Case("GroupNorm-group-runs", lambda: nn.GroupNorm(4, 16), (32, 16, 4, 4),
         ["contiguous", "strided"]),
    Case("GroupNorm-group-runs-masked", lambda: nn.GroupNorm(6, 24), (16, 24, 10, 10)),
    # the backward in blocks of 16 planes or more across groups and images (one plane a group,
    # 12 an image: a thread's 18 groups in blocks of 16 and 2; two a group); 16-bit planes of up
    # to four chunks (7x7 ending in a masked one) as one run a block
    Case("InstanceNorm-group-blocks", lambda: nn.InstanceNorm2d(12, affine=True), (3, 12, 4, 4),
         ["contiguous", "strided"]),
    Case("InstanceNorm-group-blocks-7x7", lambda: nn.InstanceNorm2d(10, affine=True),
         (2, 10, 7, 7)),
    Case("GroupNorm-group-blocks", lambda: nn.GroupNorm(6, 12), (4, 12, 4, 4)),
    # fp32/fp64 planes vector by vector, each plane's last vector overlapping the one before
    # (vector_planes): 5x5 (25 values: three vectors and an overlapping fourth under AVX2)
    # forward and backward; 3x3 (9: one vector and one overlapping) in the backward (the
    # forward's groups of 9 values go in scalar code)
    Case("GroupNorm-vector-planes", lambda: nn.GroupNorm(3, 6), (4, 6, 5, 5),
         ["contiguous", "strided"]),
    Case("InstanceNorm-vector-planes-3x3", lambda: nn.InstanceNorm2d(8, affine=True),
         (4, 8, 3, 3)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case,layout", [(c, layout) for c in CPP_CASES for layout in c.layouts],
                         ids=lambda v: v.name if isinstance(v, Case) else v)
def test_cpp_kernels_match_torch_at_larger_shapes(case, layout, dtype):
    with normkernels.backend("cpp"):
        _check_matches_torch(triple(case, dtype), case, layout, dtype)


# torch.jit.script compiles every torch.nn norm module but SyncBatchNorm (torch.distributed is not
# scriptable), and so every twin of ours but that one.
SCRIPT_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.filterwarnings("ignore:`torch.jit.")
@pytest.mark.parametrize("dtype", SCRIPT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case,layout", [p for p in all_case_params()
                                         if not p.values[0].name.startswith("SyncBatchNorm")])
def test_scripted_module_matches_torchs(case, layout, dtype):
    """TorchScript: each module scripted (torch's, ours, the fp64 reference), the same checks as
    above; ours calls our ops and no ATen norm op, and survives torch.jit.save/load."""
    mods = {k: torch.jit.script(m) for k, m in triple(case, dtype).items()}
    graph = str(mods["ours"].inlined_graph)
    assert "normkernels::" in graph
    assert not [op for op in ATEN_NORM_OPS if f"aten::{op}(" in graph], graph
    _check_matches_torch(mods, case, layout, dtype)
    buf = io.BytesIO()
    torch.jit.save(mods["ours"], buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = make_input(case.shape, layout, dtype)
    torch.testing.assert_close(loaded(x), mods["ours"](x), rtol=0, atol=0)
