import atexit
import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

# The checks torch keeps for CI services, on in every run of the suite, so that it means the same
# here as in CI: set before torch is imported (some of torch's defaults read it then), e.g.
# inductor refusing an implicit fallback for an op with a decomposition (normkernels/_inductor.py)
# and AOTAutograd erroring on a custom op whose output aliases an input.
os.environ.setdefault("CI", "1")

import torch  # noqa: E402  (imports no Triton)

# Without a GPU, the Triton kernels run under Triton's interpreter; it must be chosen before
# Triton is first imported. (Asked of torch, not of /dev/nvidia0: a sandboxed GPU machine need
# not have that node.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

# Inductor keeps compiled graphs across runs (under /tmp); a cached graph skips lowering, where
# inductor checks the ops it is given, so a test could pass on a machine's warm cache and fail
# on a fresh one (it did: a CI-only check). Each run compiles into a cache of its own.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _inductor_cache = tempfile.mkdtemp(prefix="normkernels-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)

import normkernels  # noqa: E402,F401  (loads the ops)


# Every correctness test that takes `backend_name` runs once per backend that can run its CPU
# tensors here: the Triton kernels run them only under the interpreter (on a machine with a GPU
# the interpreter is off, and tests/test_triton.py runs the Triton kernels on CUDA tensors).
BACKENDS = ["cpp"]
if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":
    BACKENDS.append("triton")


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    with normkernels.backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
