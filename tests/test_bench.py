"""The benchmark times what it says: every provider's step computes what torch's does, and the
torch.compile provider compiles every case (not only the first few)."""
import pytest
import torch
import torch.nn.functional as TF

import normkernels.functional as NF
from bench import providers
from bench.cases import Case, build, suite

# The quick CPU suite with its chain cases, shrunk: same families, modes and layouts, small shapes.
SMALL = {"layer_norm": (64, 256), "rms_norm": (64, 256), "group_norm": (2, 64, 8, 8),
         "batch_norm": (4, 32, 7, 7), "instance_norm": (2, 16, 8, 8)}
CASES = sorted({Case(c.family, SMALL[c.family], c.mode, c.dtype, c.layout)
                for c in suite("cpu", [torch.float32, torch.bfloat16], quick=True, chain=True)},
               key=lambda c: c.name)


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_ours_step_computes_torchs(case):
    steps = []
    for F in (NF, TF):
        torch.manual_seed(1)  # the same dy for both (seed 0 would draw dy = x, a degenerate dx)
        steps.append(build(case, F, "cpu"))
    ours, theirs = (_flat(step()) for step in steps)
    assert len(ours) == len(theirs) > 0
    # Relative to the whole tensor, not per element: a step that computed something else would be
    # off by its order of magnitude; bf16 steps differ in their roundings (torch's bf16 weight
    # gradients of 64 rows, say, are summed in bf16 by its kernels, where ours accumulate in fp32).
    tol = 2e-2 if case.dtype == torch.bfloat16 else 1e-5
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)
        assert err < tol, f"relative error {err:.2e}"



def test_chain_cases_follow_each_forward():
    plain = suite("cpu", [torch.float32], quick=True)
    chained = suite("cpu", [torch.float32], quick=True, chain=True)
    forwards = [c for c in plain if c.mode == "fwd"]
    assert forwards and [c for c in chained if c.mode != "chain"] == plain
    for c in forwards:
        nxt = chained[chained.index(c) + 1]
        assert (nxt.mode, nxt.family, nxt.shape, nxt.layout) == ("chain", c.family, c.shape, c.layout)
    assert len(chained) == len(plain) + len(forwards)
    assert Case("layer_norm", (4, 8), "chain", torch.float32).traffic_bytes() == 3 * 4 * 8 * 4


def test_compile_provider_compiles_every_case():
    # More cases than dynamo's recompile limit, through the same step lambda; the eager backend
    # keeps it quick. Each case must add compiled graphs of its own.
    from torch._dynamo.utils import counters

    cases = [Case("layer_norm", (4, n), "fwd", torch.float32) for n in range(8, 8 + 4 * 12, 4)]
    config = torch._dynamo.config  # recompile_limit was cache_size_limit before torch 2.7
    limit = getattr(config, "recompile_limit", None) or config.cache_size_limit
    assert len(cases) > limit
    for case in cases:
        before = counters["stats"]["unique_graphs"]
        step = build(case, TF, "cpu", compile_fn=lambda f: providers.compile_fresh(f, backend="eager"))
        step()
        assert counters["stats"]["unique_graphs"] > before, case.name
