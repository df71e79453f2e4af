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


def make(provider: str, case: Case, device: str) -> Optional[Callable[[], object]]:
    """The timed callable of `provider` for `case`, or None where it has no such kernel."""
    global _liger
    if provider in ("torch", "torch (control)"):
        return build(case, TF, device)
    if provider == "ours":
        return build(case, NF, device)
    if provider == "torch.compile":
        return build(case, TF, device, compile_fn=torch.compile)
    if provider == "liger":
        if case.family not in _LigerFunctional.families:
            return None
        if _liger is None:
            _liger = _LigerFunctional()
        return build(case, _liger, device)
    raise ValueError(provider)
