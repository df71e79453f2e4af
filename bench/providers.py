"""Who is measured: ours, torch eager, a torch-vs-torch control, torch.compile, and peers found
installed (absent peers are skipped with a note)."""
from __future__ import annotations

import importlib.util
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as TF

import normkernels.functional as NF

from .cases import Case, build


class _LigerFunctional:
    """Liger-Kernel's layer/RMS norm behind F.* signatures (CUDA only, no bias-free LN)."""

    families = ("layer_norm", "rms_norm")

    def __init__(self):
        from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm

        self._ln, self._rms = liger_layer_norm, liger_rms_norm

    def layer_norm(self, x, shape, w, b, eps=1e-5):
        return self._ln(x, w, b, eps)

    def rms_norm(self, x, shape, w, eps=None):
        return self._rms(x, w, 1e-6 if eps is None else eps, in_place=False)


def available(device: str, with_compile: bool) -> Tuple[List[str], List[str]]:
    """(providers to run, notes on those skipped)."""
    names = ["torch", "torch (control)", "ours"]
    notes = []
    if with_compile:
        names.append("torch.compile")
    if importlib.util.find_spec("liger_kernel") is None:
        notes.append("liger-kernel: not installed, skipped")
    elif device != "cuda":
        notes.append("liger-kernel: installed, but its kernels are CUDA-only, skipped")
    else:
        names.append("liger")
    return names, notes


_liger: Optional[_LigerFunctional] = None


def compile_fresh(fn: Callable, **options) -> Callable:
    """torch.compile of one case's step, compiled for that case alone. Dynamo keeps compiled
    code per code object, and every case's step is the same lambda of cases.build: without a
    reset, each case added a recompilation to that code object's cache until its recompile_limit
    (8), after which dynamo silently ran every later case eagerly (a "torch.compile" column that
    timed eager torch). Resetting before each case also keeps the guard checks of earlier cases
    out of the timed calls."""
    torch._dynamo.reset()
    return torch.compile(fn, **options)


def make(provider: str, case: Case, device: str) -> Optional[Callable[[], object]]:
    """The timed callable of `provider` for `case`, or None where it has no such kernel."""
    global _liger
    if provider in ("torch", "torch (control)"):
        return build(case, TF, device)
    if provider == "ours":
        return build(case, NF, device)
    if provider == "torch.compile":
        return build(case, TF, device, compile_fn=compile_fresh)
    if provider == "liger":
        if case.family not in _LigerFunctional.families:
            return None
        if _liger is None:
            _liger = _LigerFunctional()
        return build(case, _liger, device)
    raise ValueError(provider)
