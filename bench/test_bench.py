"""The benchmark cases through pytest-benchmark, for tracking results over time:

    pytest bench --benchmark-only [-k layer_norm] [--benchmark-json out.json]

One benchmark per (case, provider); the quick CPU suite in fp32 and bf16. Ratios side by side
in one run come from `python -m bench`; this is for history (pytest-benchmark's compare).
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench import providers  # noqa: E402
from bench.cases import suite  # noqa: E402

CASES = suite("cpu", [torch.float32, torch.bfloat16], quick=True)


@pytest.mark.parametrize("provider", ["torch", "ours"])
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_norm(benchmark, case, provider):
    fn = providers.make(provider, case, "cpu")
    benchmark.group = case.name
    benchmark.extra_info["traffic_bytes"] = case.traffic_bytes()
    benchmark(fn)
