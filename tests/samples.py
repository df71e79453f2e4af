"""One generator of cases feeding parity, opcheck, gradcheck, compile and no-ATen tests.

A case is a torch.nn module (ours is its converted twin), an input shape and a layout. Inputs are
made in the requested layout: contiguous, channels_last(_3d), or strided (a view that is neither:
every other element of a wider tensor, or a transposed tensor).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import normkernels

class OpRecorder(TorchDispatchMode):
    """Records the name of every op dispatched inside it (``aten.add.Tensor``,
    ``normkernels.layer_norm_fwd.default``), in order; under vmap and the torch.func transforms,
    the ones that reach the kernels."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

    def ours(self):
        """How many normkernels ops ran."""
        return sum(n.startswith("normkernels.") for n in self.names)

    def aten_norms(self):
        """The ATen normalization ops that ran (none should, where our modules do the work)."""
        return aten_norms(self.names)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    shape: Tuple[int, ...]
    layouts: List[str] = field(default_factory=lambda: ["contiguous", "strided"])

    def ids(self):
        return [f"{self.name}-{layout}" for layout in self.layouts]


CASES: List[Case] = [
    # layer norm / RMS norm
    Case("LayerNorm-1d", lambda: nn.LayerNorm(37), (5, 3, 37)),
    Case("LayerNorm-2d", lambda: nn.LayerNorm((6, 13)), (4, 6, 13)),
    Case("LayerNorm-noaffine", lambda: nn.LayerNorm(64, elementwise_affine=False), (9, 64)),
    Case("LayerNorm-nobias", lambda: nn.LayerNorm(100, bias=False), (3, 100)),
    Case("LayerNorm-unbatched", lambda: nn.LayerNorm(19), (19,), ["contiguous"]),
    Case("RMSNorm", lambda: nn.RMSNorm(48), (7, 48)),
    Case("RMSNorm-eps", lambda: nn.RMSNorm((4, 33), eps=1e-6), (5, 4, 33)),
    Case("RMSNorm-noaffine", lambda: nn.RMSNorm(40, elementwise_affine=False), (6, 40)),
    # group norm
    Case("GroupNorm-4d", lambda: nn.GroupNorm(4, 12), (3, 12, 5, 7), ["contiguous", "channels_last", "strided"]),
    Case("GroupNorm-5d", lambda: nn.GroupNorm(3, 6, eps=1e-3), (2, 6, 3, 4, 5), ["contiguous", "channels_last", "strided"]),
    Case("GroupNorm-3d", lambda: nn.GroupNorm(1, 7), (4, 7, 11)),
    Case("GroupNorm-2d", lambda: nn.GroupNorm(5, 10), (6, 10)),
    Case("GroupNorm-prime-per-group", lambda: nn.GroupNorm(13, 13), (2, 13, 3, 3), ["contiguous", "channels_last"]),
    Case("GroupNorm-noaffine", lambda: nn.GroupNorm(2, 8, affine=False), (2, 8, 4, 4), ["contiguous", "channels_last"]),
    # channels_last rows of 1 KB and more per stripe of groups: the forward's and backward's
    # stripes paths, in stripes of unequal group counts (one image, 6 groups: four stripes with
    # 2 threads)
    Case("GroupNorm-stripes", lambda: nn.GroupNorm(6, 3072), (1, 3072, 3, 3), ["channels_last"]),
    # stripes of 520 and 1040 channels starting off a SIMD chunk's boundary: each is walked in
    # two-chunk register tiles, a one-chunk tile and a masked one, whose per-channel arrays the
    # bf16 kernels put in the chunks' lane order and back
    Case("GroupNorm-stripes-uneven", lambda: nn.GroupNorm(6, 3120), (1, 3120, 3, 3), ["channels_last"]),
    # rows of 100 channels (no stripes): a two-chunk tile, a one-chunk tile and a masked tile
    Case("GroupNorm-wide", lambda: nn.GroupNorm(4, 100), (2, 100, 4, 4), ["channels_last"]),
    # one (n, group) task for two or more threads: the NCHW backward takes its two-pass path
    # (planes in parallel) instead of one fused task per group
    Case("GroupNorm-onegroup", lambda: nn.GroupNorm(1, 6), (1, 6, 5, 5), ["contiguous"]),
    # batch norm
    Case("BatchNorm1d-2d", lambda: nn.BatchNorm1d(11), (8, 11)),
    Case("BatchNorm1d-3d", lambda: nn.BatchNorm1d(5), (4, 5, 9)),
    Case("BatchNorm2d", lambda: nn.BatchNorm2d(6), (3, 6, 5, 4), ["contiguous", "channels_last", "strided"]),
    Case("BatchNorm2d-prime", lambda: nn.BatchNorm2d(37), (2, 37, 3, 3), ["contiguous", "channels_last"]),
    # channels_last rows of 100: a two-chunk tile, a one-chunk tile and a masked tile
    Case("BatchNorm2d-wide", lambda: nn.BatchNorm2d(100), (2, 100, 3, 3), ["channels_last"]),
    # planes of 81 (over two SIMD chunks, odd): most planes start misaligned, so the elementwise
    # passes take their masked head, aligned body and masked tail
    Case("BatchNorm2d-oddplane", lambda: nn.BatchNorm2d(3), (2, 3, 9, 9)),
    # planes shorter than two chunks are walked as blocks of channels, one contiguous span per
    # sample (ShortPlanes): with 2 threads, 25-value planes across 50 channels make spans of 20
    # channels (500 values) in training and backward, 25 in inference, each register tiles and a
    # masked tile; 7x7 planes make spans of 10 channels (490 values) in training. The output
    # passes go by groups of 4 samples: 7 is a whole group and a partial one
    Case("BatchNorm2d-shortplanes", lambda: nn.BatchNorm2d(50), (7, 50, 5, 5)),
    # 32 samples or more: under AVX2 the short-plane backward walks bf16 in lane order too
    Case("BatchNorm2d-shortplanes-batch", lambda: nn.BatchNorm2d(20), (33, 20, 5, 5), ["contiguous"]),
    Case("BatchNorm2d-7x7", lambda: nn.BatchNorm2d(24), (4, 24, 7, 7), ["contiguous", "strided"]),
    # one or two samples: short planes walked one by one all the same (plane_walk_samples): 7x7
    # in every pass with one sample, 6x6 in inference with two, 3x3 in inference with one
    Case("BatchNorm2d-7x7-single", lambda: nn.BatchNorm2d(24), (1, 24, 7, 7), ["contiguous", "strided"]),
    Case("BatchNorm2d-6x6-pair", lambda: nn.BatchNorm2d(24), (2, 24, 6, 6)),
    Case("BatchNorm2d-3x3-single", lambda: nn.BatchNorm2d(24), (1, 24, 3, 3)),
    # inference on planes of one chunk (16 values) or more, up to 4 samples: one run of chunks
    # across planes, a chunk's coefficients blended from two channels (plane_run_affine); 5
    # channels of 25 values wrap to channel 0 at each sample, 3 x 5 x 25 ends on a masked chunk
    Case("BatchNorm2d-5x5-run", lambda: nn.BatchNorm2d(5), (3, 5, 5, 5), ["contiguous", "strided"]),
    # one value per plane: walked as [N, C] rows
    Case("BatchNorm2d-1x1", lambda: nn.BatchNorm2d(6), (8, 6, 1, 1), ["contiguous"]),
    Case("BatchNorm2d-noaffine", lambda: nn.BatchNorm2d(4, affine=False), (2, 4, 3, 3)),
    # fewer channels than threads: the NCHW backward's two-pass path, not one task per channel
    Case("BatchNorm2d-onechannel", lambda: nn.BatchNorm2d(1), (4, 1, 5, 5), ["contiguous"]),
    Case("BatchNorm2d-cumulative", lambda: nn.BatchNorm2d(4, momentum=None), (2, 4, 3, 3)),
    Case("BatchNorm2d-nostats", lambda: nn.BatchNorm2d(4, track_running_stats=False), (2, 4, 3, 3), ["contiguous", "channels_last"]),
    Case("BatchNorm3d", lambda: nn.BatchNorm3d(3), (2, 3, 3, 4, 5), ["contiguous", "channels_last", "strided"]),
    Case("SyncBatchNorm", lambda: nn.SyncBatchNorm(5), (3, 5, 4, 4), ["contiguous", "channels_last"]),
    # instance norm
    Case("InstanceNorm1d", lambda: nn.InstanceNorm1d(5), (3, 5, 9)),
    Case("InstanceNorm1d-unbatched", lambda: nn.InstanceNorm1d(5, affine=True), (5, 9), ["contiguous"]),
    Case("InstanceNorm2d-affine", lambda: nn.InstanceNorm2d(6, affine=True), (2, 6, 5, 5), ["contiguous", "channels_last", "strided"]),
    Case("InstanceNorm2d-stats", lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (3, 4, 6, 5), ["contiguous", "channels_last"]),
    Case("InstanceNorm2d-oddplane", lambda: nn.InstanceNorm2d(3, affine=True), (2, 3, 7, 7)),
    Case("GroupNorm-1x1", lambda: nn.GroupNorm(3, 6), (4, 6, 1, 1), ["contiguous"]),
    Case("InstanceNorm3d", lambda: nn.InstanceNorm3d(3, affine=True), (2, 3, 3, 4, 4), ["contiguous", "channels_last"]),
]


def all_case_params():
    params = []
    for case in CASES:
        for layout in case.layouts:
            params.append(pytest.param(case, layout, id=f"{case.name}-{layout}"))
    return params


def make_input(shape, layout: str, dtype, scale=1.0, shift=0.0, device="cpu") -> torch.Tensor:
    """A random tensor of `shape` in the given memory layout: contiguous, channels_last(_3d), or
    strided (a transposed view for 3+ dims, every other element of a wider tensor otherwise).
    Drawn on the CPU (the same values on any device), then viewed on `device`."""
    shape = tuple(shape)
    view = lambda b: b  # noqa: E731
    base_shape = shape
    if layout == "strided" and len(shape) >= 3:
        base_shape = shape[:-2] + (shape[-1], shape[-2])
        view = lambda b: b.transpose(-1, -2)  # noqa: E731
    elif layout == "strided":
        base_shape = shape[:-1] + (2 * shape[-1],)
        view = lambda b: b[..., ::2]  # noqa: E731
    base = (torch.randn(base_shape, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)
    x = view(base)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
        assert not x.is_contiguous()
    if layout == "strided":
        assert not x.is_contiguous() and x.dim() == len(shape)
    return x


def randomize_(module: nn.Module) -> nn.Module:
    """Random affine parameters and running statistics, so tests see them used."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "weight" in name else 0.0))
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.copy_(torch.randn_like(module.running_mean) * 0.1)
            module.running_var.copy_(torch.rand_like(module.running_var) + 0.5)
    return module


def triple(case: Case, dtype, device="cpu") -> Dict[str, nn.Module]:
    """torch's module at dtype, our converted twin at dtype, and torch's at fp64 (the reference),
    all on `device`."""
    base = randomize_(case.make())
    torch_m = copy.deepcopy(base).to(device=device, dtype=dtype)
    ours = normkernels.convert(copy.deepcopy(base).to(device=device, dtype=dtype))
    ref = copy.deepcopy(base).to(device=device, dtype=torch.float64)
    return {"torch": torch_m, "ours": ours, "ref": ref}


# ATen's norm ops (as substrings of op names): none may run where ours should.
ATEN_NORM_OPS = ("norm", "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm")


def aten_norms(names):
    """The ATen normalization ops among op names (``aten.native_layer_norm.default``)."""
    return [n for n in names if n.startswith("aten.") and any(k in n for k in ATEN_NORM_OPS)]

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_like_torch(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, what: str):
    """ours may be off the fp64 reference by at most twice torch's own error, plus a small
    dtype-scaled margin (so fp16/bf16 are judged against torch's half error)."""
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != {theirs.dtype}"
    ref = ref.double()
    scale = 1.0 + ref.abs().max().item() if ref.numel() else 1.0
    err_ours = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    err_torch = (theirs.double() - ref).abs().max().item() if ref.numel() else 0.0
    bound = 2.0 * err_torch + ATOL[ours.dtype] * scale
    assert err_ours <= bound, f"{what}: error {err_ours:.3g} vs torch's {err_torch:.3g} (bound {bound:.3g})"
