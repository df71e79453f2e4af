"""Which kernels run: ``normkernels.backend("auto" | "cpp" | "triton")``.

"auto" (the default) runs the C++ kernels on CPU tensors and the Triton kernels on CUDA tensors.
Asking for a backend that cannot run a tensor raises; nothing falls back silently, least of all
to ATen's own norm kernels.

The choice is process-wide (a plain module global, which ``torch.compile`` can read without a
graph break), restored when the ``with`` block exits.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

BACKENDS = ("auto", "cpp", "triton")
_state = {"name": "auto"}


def triton_available() -> bool:
    """The Triton kernels are not part of this build yet (see the README's support matrix)."""
    return False


def current() -> str:
    return _state["name"]


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the normkernels ops inside the block on the named backend."""
    if name not in BACKENDS:
        raise ValueError(f"normkernels.backend: unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "triton" and not triton_available():
        raise RuntimeError(
            "normkernels.backend('triton'): the Triton kernels are not available in this build "
            "of normkernels; use 'cpp' (CPU tensors) or 'auto'"
        )
    previous = _state["name"]
    _state["name"] = name
    try:
        yield
    finally:
        _state["name"] = previous


def check_runnable(x: torch.Tensor, op: str) -> None:
    """Raise, before any kernel runs, if the chosen backend has no kernel for x's device."""
    device = x.device.type
    if device in ("cpu", "meta"):
        if _state["name"] == "triton":  # pragma: no cover - unreachable until Triton lands
            raise RuntimeError(f"normkernels.{op}: the Triton backend needs TRITON_INTERPRET=1 for CPU tensors")
        return
    raise NotImplementedError(
        f"normkernels.{op}: no kernels for {device} tensors in this build (backend "
        f"{_state['name']!r}): only the C++ CPU kernels are available; move the model to the "
        "CPU or use torch.nn for this device"
    )
