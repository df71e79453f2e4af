import importlib.util
import os
import sys

# Without a GPU, the Triton kernels run under Triton's interpreter; it must be chosen before
# Triton is first imported.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

import normkernels  # noqa: E402,F401  (loads the ops)


# Every correctness test that takes `backend_name` runs once per backend that can run here.
BACKENDS = ["cpp"]
if importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
):
    BACKENDS.append("triton")


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    with normkernels.backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
