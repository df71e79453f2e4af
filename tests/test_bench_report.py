"""The benchmark's runner: one tiny case through `bench.run` and `bench.markdown`, checking the
per-round paired ratios it reports beside the medians."""
import argparse

import pytest

from bench.__main__ import markdown, run
from bench.timing import paired_ratios


def test_paired_ratios_are_per_round():
    # a slow phase hitting both providers in round 2 cancels out of its ratio
    r = paired_ratios([2.0, 20.0, 2.0, 2.0], [1.0, 10.0, 1.0, 4.0])
    assert r["median"] == pytest.approx(2.0)
    assert r["q1"] <= r["median"] <= r["q3"]
    assert r["rounds_below_1"] == 1 and r["rounds"] == 4


def test_run_reports_paired_speedups():
    args = argparse.Namespace(device="cpu", dtype="float32", filter="^layer_norm 1x768 fwd fp32",
                              quick=True, rounds=3, no_compile=True, malloc="default", out=None)
    result = run(args)
    (row,) = result["rows"]
    paired = row["speedup_vs_torch_paired"]
    assert paired["rounds"] == 3
    assert paired["q1"] <= paired["median"] <= paired["q3"]
    assert "slower_than_torch_paired_q3" in result["summary"]
    md = markdown(result)
    assert "paired (IQR)" in md and f"{paired['median']:.2f}x (" in md
