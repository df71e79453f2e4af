"""The benchmark's runner: one tiny case through `bench.run` and `bench.markdown`, checking the
per-round paired ratios it reports beside the medians, and what each timed sample follows."""
import argparse

import pytest

from bench.__main__ import markdown, run
from bench.timing import paired_ratios, round_robin


def test_paired_ratios_are_per_round():
    # a slow phase hitting both providers in round 2 cancels out of its ratio
    r = paired_ratios([2.0, 20.0, 2.0, 2.0], [1.0, 10.0, 1.0, 4.0])
    assert r["median"] == pytest.approx(2.0)
    assert r["q1"] <= r["median"] <= r["q3"]
    assert r["rounds_below_1"] == 1 and r["rounds"] == 4


def test_run_reports_paired_speedups():
    args = argparse.Namespace(device="cpu", dtype="float32", filter="^layer_norm 1x768 fwd fp32",
                              quick=True, rounds=3, no_compile=True, malloc="default", start="warm",
                              out=None)
    result = run(args)
    (row,) = result["rows"]
    paired = row["speedup_vs_torch_paired"]
    assert paired["rounds"] == 3
    assert paired["q1"] <= paired["median"] <= paired["q3"]
    assert "slower_than_torch_paired_q3" in result["summary"]
    md = markdown(result)
    assert result["machine"]["start"] == "warm" and "--start warm" in md
    assert "paired (IQR)" in md and f"{paired['median']:.2f}x (" in md


@pytest.mark.parametrize("start", ["warm", "after-others"])
def test_round_robin_start(start):
    # calls to each provider in order; with sample_s this small a sample is one call
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c")}
    rounds = 4
    res = round_robin(fns, "cpu", rounds, sample_s=1e-12, start=start)
    assert all(r["calls"] == 1 and r["samples"] == rounds for r in res.values())
    timed = log[len(fns) * 5:]  # after calibration: two calls, then three single timed ones
    per_sample = 2 if start == "warm" else 1
    assert len(timed) == rounds * len(fns) * per_sample
    runs = [timed[i:i + per_sample] for i in range(0, len(timed), per_sample)]
    # warm: each timed call comes just after an untimed call of the same provider
    assert all(len(set(run)) == 1 for run in runs)
    for r in range(rounds):  # every provider once a round
        assert sorted(run[0] for run in runs[r * len(fns):(r + 1) * len(fns)]) == ["a", "b", "c"]


def test_round_robin_rejects_unknown_start():
    with pytest.raises(ValueError, match="start"):
        round_robin({"a": lambda: None}, "cpu", 1, start="cold")
