"""Which kernels run: ``normkernels.backend("auto" | "cpp" | "triton")``.

- "auto" (the default): the C++ kernels for CPU tensors, the Triton kernels for CUDA tensors.
- "cpp": the C++ kernels; CUDA tensors raise (there are no C++ CUDA kernels).
- "triton": the Triton kernels. CUDA tensors run them natively; CPU tensors run them under
  Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment before Triton is
  first imported (that is how CI tests them on machines without a GPU). With a GPU and the
  interpreter off, CPU tensors take the C++ kernels: routing them, or refusing them, would take a
  dispatch mode, under which torch.compile refuses to trace the CUDA calls.

Asking for a backend that cannot run raises a clear error; nothing falls back silently, least
of all to ATen's own norm kernels. The choice is process-wide (a plain module global, which
``torch.compile`` can read without a graph break) and restored when the ``with`` block exits.
Under "triton", CPU tensors are routed by a dispatch mode below autograd, so the forward and the
backward of everything run inside the block use the Triton kernels.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BACKENDS = ("auto", "cpp", "triton")
_state = {"name": "auto"}


# Looked up once: check_runnable asks on every CUDA call, and torch.compile cannot trace
# importlib (a graph break, which fullgraph=True turns into an error: seen on an H200).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def current() -> str:
    return _state["name"]


@functools.lru_cache(maxsize=None)
def triton_impls() -> dict:
    """{OpOverload: Triton launcher}; imports the Triton kernels on first use."""
    from . import triton as nk_triton

    ops = torch.ops.normkernels
    return {getattr(ops, name).default: fn for name, fn in nk_triton.IMPLS.items()}


class _TritonOnCPU(TorchDispatchMode):
    """Sends normkernels ops on CPU tensors to the Triton launchers (interpreted)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        impl = triton_impls().get(func)
        if impl is not None:
            return impl(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the normkernels ops inside the block on the named backend."""
    if name not in BACKENDS:
        raise ValueError(f"normkernels.backend: unknown backend {name!r}; choose one of {BACKENDS}")
    mode = None
    if name == "triton":
        if not triton_installed():
            raise RuntimeError(
                "normkernels.backend('triton'): Triton is not installed (pip install triton)"
            )
        if not torch.cuda.is_available() and not triton_interpreter():
            raise RuntimeError(
                "normkernels.backend('triton'): no CUDA device, and Triton's interpreter is off: "
                "set TRITON_INTERPRET=1 in the environment before starting Python to run the "
                "Triton kernels on CPU tensors"
            )
        if triton_interpreter():
            triton_impls()  # import (and so compile-check) the kernels before any tensor work
            mode = _TritonOnCPU()
    previous = _state["name"]
    _state["name"] = name
    try:
        if mode is None:
            yield
        else:
            with mode:
                yield
    finally:
        _state["name"] = previous


def check_runnable(x: torch.Tensor, op: str) -> None:
    """Raise, before any kernel runs, if the chosen backend has no kernel for x's device."""
    device = x.device.type
    name = _state["name"]
    if device in ("cpu", "meta"):
        return  # C++ kernels, or (under backend("triton")) the interpreted Triton kernels
    if device == "cuda":
        if name == "cpp":
            raise NotImplementedError(
                f"normkernels.{op}: backend 'cpp' has no CUDA kernels; use backend('auto') or "
                "backend('triton') for CUDA tensors"
            )
        if triton_installed():
            return
        raise NotImplementedError(
            f"normkernels.{op}: CUDA tensors need the Triton kernels, and Triton is not installed"
        )
    raise NotImplementedError(
        f"normkernels.{op}: no kernels for {device} tensors (backend {name!r}): normkernels runs "
        "CPU tensors (C++, or Triton's interpreter) and CUDA tensors (Triton)"
    )
