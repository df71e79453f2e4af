"""normkernels: fused forward and backward kernels for the normalization layers of PyTorch.

    import normkernels
    normkernels.convert(model)          # every torch.nn norm of the model on our kernels
    normkernels.revert(model)           # and back onto torch.nn's
    normkernels.nn.LayerNorm(768)       # drop-in modules
    normkernels.functional.group_norm   # F.* signatures
    with normkernels.backend("cpp"): ...

CPU tensors run the C++ kernels (csrc/), CUDA tensors the Triton kernels (normkernels/triton/).
"""
import ctypes
import os
import sys

import torch  # noqa: F401  (loads libtorch, which the extension links against)


def ops_library_path():
    """The path of libnormkernels_ops.so, the library of our ops (schemas, CPU kernels, autograd)
    that needs libtorch and not Python. Importing normkernels loads it; a C++ process, such as
    one serving an AOTInductor package or a TorchScript file of a converted model, loads it with
    dlopen before running the model (the model calls our ops through the dispatcher)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "libnormkernels_ops.so")


try:
    if not sys.platform.startswith("linux"):
        # Only on Linux does _C name the library as a dependency (setup.py); elsewhere its
        # symbols are found among those loaded globally.
        ctypes.CDLL(ops_library_path(), mode=ctypes.RTLD_GLOBAL)
    from . import _C
except (ImportError, OSError) as e:  # pragma: no cover - only when the extension was not built
    raise ImportError(
        "normkernels._C (the C++ extension) is not built: install with "
        "`pip install --no-build-isolation .` in the source tree"
    ) from e

from . import _ops  # noqa: F401,E402  (fake kernels and autograd of the ops)
from . import _decompositions  # noqa: F401,E402  (the ops in ATen ops, for exporters)
from . import _inductor  # noqa: F401,E402  (inductor keeps those ops as calls, also under CI=1)
from . import _vmap  # noqa: F401,E402  (torch.vmap batching rules of the forward ops)
from . import functional, nn, onnx  # noqa: E402
from .backend import backend  # noqa: E402
from .convert import convert, revert  # noqa: E402

__version__ = "0.1.0"
cpu_capability = _C.cpu_capability
# Large CPU outputs come from a pool of freed blocks (csrc/cpu/output_pool.h: it saves the page
# faults of fresh memory each step); these release and report its idle memory, as
# torch.cuda.empty_cache / memory_reserved do for the GPU.
empty_cpu_cache = _C.empty_cpu_cache
cached_cpu_bytes = _C.cached_cpu_bytes

__all__ = ["functional", "nn", "onnx", "backend", "convert", "revert", "cpu_capability",
           "empty_cpu_cache", "cached_cpu_bytes", "ops_library_path"]
