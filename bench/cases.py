"""The benchmark cases: each norm family at the sizes of the models that use it.

A case builds, for one provider's functional namespace (torch.nn.functional, or
normkernels.functional: same signatures), a zero-argument callable doing exactly one step:
  fwd    training forward (batch statistics, running statistics updated where the module would)
  infer  inference forward with running statistics (batch norm)
  bwd    backward alone, through a graph kept from one forward
  fwdbwd forward then backward for the input and every parameter
  chain  training forward, then the next op reads y: y.sum(), the same op for every provider,
         standing in for the layer after (a real layer's output is read at once; fwd alone
         times a loop in which nothing reads it). Not in the default suite (suite(chain=True),
         python -m bench --chain).
Minimum traffic counted for GB/s: fwd/infer read x, write y; bwd reads x and dy, writes dx;
fwdbwd is both; chain is fwd plus reading y.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, Tuple

import torch

MODES = ("fwd", "infer", "bwd", "fwdbwd", "chain")


@dataclass(frozen=True)
class Case:
    family: str  # layer_norm | rms_norm | group_norm | batch_norm | instance_norm
    shape: Tuple[int, ...]
    mode: str
    dtype: torch.dtype
    layout: str = "contiguous"  # or channels_last
    groups: int = 32  # group norm

    @property
    def name(self) -> str:
        shape = "x".join(str(d) for d in self.shape)
        layout = " cl" if self.layout == "channels_last" else ""
        groups = f" g{self.groups}" if self.family == "group_norm" and self.groups != 32 else ""
        dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"{self.family} {shape}{groups}{layout} {self.mode} {dt}"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def traffic_bytes(self) -> int:
        elems = {"fwd": 2, "infer": 2, "bwd": 3, "fwdbwd": 5, "chain": 3}[self.mode]
        return elems * self.numel * torch.empty((), dtype=self.dtype).element_size()

    def working_set_bytes(self) -> int:
        """Distinct bytes one step touches (x, y, and dy/dx for backward)."""
        elems = {"fwd": 2, "infer": 2, "bwd": 3, "fwdbwd": 4, "chain": 2}[self.mode]
        return elems * self.numel * torch.empty((), dtype=self.dtype).element_size()


def _inputs(case: Case, device: str, requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=g).to(device=device, dtype=case.dtype)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    pshape = case.shape[-1:] if case.family in ("layer_norm", "rms_norm") else case.shape[1:2]
    w = (torch.rand(pshape, generator=g) + 0.5).to(device=device, dtype=case.dtype)
    b = torch.randn(pshape, generator=g).to(device=device, dtype=case.dtype)
    if requires_grad:
        x.requires_grad_()
        w.requires_grad_()
        b.requires_grad_()
    return x, w, b


def _forward(F, case: Case, x, w, b, state):
    if case.family == "layer_norm":
        return F.layer_norm(x, case.shape[-1:], w, b)
    if case.family == "rms_norm":
        return F.rms_norm(x, list(case.shape[-1:]), w)
    if case.family == "group_norm":
        return F.group_norm(x, case.groups, w, b)
    if case.family == "instance_norm":
        return F.instance_norm(x, None, None, w, b, True)
    if case.family == "batch_norm":
        rm, rv = state
        return F.batch_norm(x, rm, rv, w, b, case.mode != "infer", 0.1, 1e-5)
    raise ValueError(case.family)


def build(case: Case, F, device: str, compile_fn: Callable = None) -> Callable[[], object]:
    """The callable timing one step of `case` with functional namespace F (optionally wrapped
    in torch.compile by compile_fn)."""
    grad = case.mode in ("bwd", "fwdbwd")
    x, w, b = _inputs(case, device, grad)
    c = case.shape[1] if x.dim() > 1 else case.shape[0]
    state = (torch.zeros(c, device=device, dtype=case.dtype), torch.ones(c, device=device, dtype=case.dtype))
    fwd = lambda x, w, b: _forward(F, case, x, w, b, state)  # noqa: E731
    if compile_fn is not None:
        fwd = compile_fn(fwd)
    if case.mode in ("fwd", "infer"):
        return lambda: fwd(x, w, b)
    if case.mode == "chain":
        return lambda: fwd(x, w, b).sum()
    dy = torch.randn_like(x)
    wrt = (x, w) if case.family == "rms_norm" else (x, w, b)  # RMSNorm has no bias
    if case.mode == "fwdbwd":
        return lambda: torch.autograd.grad(fwd(x, w, b), wrt, dy)
    y = fwd(x, w, b)
    return lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)


def suite(device: str, dtypes: List[torch.dtype], quick: bool = False,
          chain: bool = False, wide: bool = False) -> List[Case]:
    """Transformer (layer/RMS norm), diffusion UNet (group norm, 32 groups) and ResNet (batch
    norm) sizes, plus instance norm and the one-row cases that measure per-call overhead.
    chain: a chain case after each training forward (see the module's docstring).
    wide: the wide scan instead (wide_suite)."""
    cases = wide_suite(dtypes) if wide else _suite(device, dtypes, quick)
    if not chain:
        return cases
    with_chain: List[Case] = []
    for c in cases:
        with_chain.append(c)
        if c.mode == "fwd":
            with_chain.append(replace(c, mode="chain"))
    return with_chain


def _suite(device: str, dtypes: List[torch.dtype], quick: bool) -> List[Case]:
    cases: List[Case] = []
    big = device != "cpu"
    for dt in dtypes:
        ln_shapes = [(1, 768), (8192, 768), (4096, 1024), (1024, 4096), (2048, 4096), (512, 8192)]
        if big:
            ln_shapes = [(1, 768), (16384, 1024), (8192, 4096), (4096, 8192), (32768, 768)]
        if quick:
            ln_shapes = [ln_shapes[0], ln_shapes[2], ln_shapes[3]]
        for s in ln_shapes:  # 1x768: the per-call cost, not recording and recording a graph
            for mode in ("fwd", "fwdbwd"):
                cases.append(Case("layer_norm", s, mode, dt))
        rms_shapes = [(4096, 1024), (2048, 4096)] if not big else [(16384, 1024), (8192, 4096)]
        for s in rms_shapes[: 1 if quick else None]:
            for mode in ("fwd", "fwdbwd"):
                cases.append(Case("rms_norm", s, mode, dt))
        gn_shapes = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16)]
        if big:
            gn_shapes = [(8, 320, 64, 64), (8, 640, 32, 32), (8, 1280, 16, 16)]
        for s in gn_shapes[: 1 if quick else None]:
            for layout in ("contiguous", "channels_last"):
                for mode in ("fwd", "fwdbwd"):
                    cases.append(Case("group_norm", s, mode, dt, layout))
        bn_shapes = [(16, 64, 56, 56), (16, 128, 28, 28), (16, 256, 14, 14), (16, 512, 7, 7)]
        if big:
            bn_shapes = [(64, 64, 56, 56), (64, 128, 28, 28), (64, 256, 14, 14), (64, 512, 7, 7)]
        for s in bn_shapes[: 2 if quick else None]:
            for layout in ("contiguous", "channels_last"):
                for mode in ("fwd", "fwdbwd", "infer"):
                    cases.append(Case("batch_norm", s, mode, dt, layout))
        in_shape = (4, 128, 64, 64) if not big else (16, 128, 64, 64)
        for layout in ("contiguous", "channels_last")[: 1 if quick else None]:
            for mode in ("fwd", "fwdbwd"):
                cases.append(Case("instance_norm", in_shape, mode, dt, layout))
    return cases


def wide_suite(dtypes: List[torch.dtype]) -> List[Case]:
    """Shapes beyond issue 5's suite, where a kernel tuned on the suite can still lose to torch:
    short and long layer-norm rows (some not a whole number of chunks), 3-D inputs, ResNet-50's
    1024- and 2048-channel stages at batch 32 and 64 (tensors past the last-level cache, 14x14
    and 7x7 planes) and 7x7 inference at batch 1 and 2, 2-D batch norm, group norm with few
    groups or few channels and at a diffusion UNet's 8x8 stage, 3-channel instance norm. CPU
    sizes; run with python -m bench --wide."""
    cases: List[Case] = []

    def add(family, shape, layouts=("contiguous",), modes=("fwd", "fwdbwd"), groups=32):
        for dt in dtypes:
            for layout in layouts:
                for mode in modes:
                    cases.append(Case(family, shape, mode, dt, layout, groups))

    both = ("contiguous", "channels_last")
    # 80 and 100 wide: rows whose last chunk is not whole (80: a QK-norm's head_dim)
    for s in [(4096, 64), (4096, 128), (2048, 256), (64, 768), (16, 4096), (32768, 32),
              (8, 512, 768), (8192, 100)]:
        add("layer_norm", s)
    for s in [(4096, 128), (8192, 768), (2, 2048, 2048), (32768, 80)]:
        add("rms_norm", s)
    # (2, 1280, 8, 8): a Stable Diffusion UNet's lowest resolution (64x64 latents) at batch 2
    for s, g in [((8, 64, 32, 32), 32), ((4, 256, 16, 16), 8), ((1, 512, 64, 64), 32),
                 ((8, 32, 32, 32), 1), ((16, 512, 8, 8), 32), ((2, 1280, 8, 8), 32)]:
        add("group_norm", s, both, groups=g)
    for s in [(64, 2048, 7, 7), (32, 1024, 14, 14), (8, 64, 112, 112)]:
        add("batch_norm", s, both, ("fwd", "fwdbwd", "infer"))
    for s in [(256, 1024), (32, 256)]:
        add("batch_norm", s, modes=("fwd", "fwdbwd", "infer"))
    # batch 1 and 2 inference (serving) of ResNet-50's last stages: too few samples for the
    # short-plane blocks' per-element arrays to pay (see batch_norm.cpp's plane_walk_samples)
    for s in [(1, 512, 7, 7), (1, 2048, 7, 7), (2, 2048, 7, 7)]:
        add("batch_norm", s, both, ("infer",))
    for s in [(1, 3, 256, 256), (8, 64, 32, 32)]:
        add("instance_norm", s, both)
    return cases
