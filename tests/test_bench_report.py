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
                              quick=True, chain=False, rounds=3, no_compile=True,
                              malloc="default", start="warm", warm_ms=0.5, out=None)
    result = run(args)
    (row,) = result["rows"]
    paired = row["speedup_vs_torch_paired"]
    assert paired["rounds"] == 3
    assert paired["q1"] <= paired["median"] <= paired["q3"]
    assert "slower_than_torch_paired_q3" in result["summary"]
    # ours' GB/s over the 256 MB copy timed in the same round, round by round
    dram = row["pct_dram_copy_bw_paired"]
    assert dram["rounds"] == 3 and dram["q1"] <= dram["median"] <= dram["q3"]
    assert result["machine"]["copy_samples"] == 1 + 3  # one at the start, then one a round
    assert "out_of_cache_below_70pct_dram_copy_bw_paired" in result["summary"]
    md = markdown(result)
    assert f"{dram['median']:.0f}% ({dram['q1']:.0f}–{dram['q3']:.0f})" in md
    assert result["machine"]["start"] == "warm" and "--start warm" in md
    assert result["machine"]["warm_ms"] == 0.5 and "after 0.5 ms of untimed calls" in md
    assert "paired (IQR)" in md and f"{paired['median']:.2f}x (" in md
    # "in cache" judges by the CPU's private L2 here, by the GPU's L2 on CUDA
    assert "fits this run's private L2 caches" in md
    # both SIMD levels in the title: ours and torch's own kernels'
    import torch
    import normkernels

    title = f"kernels {normkernels.cpu_capability()} (torch's {torch.backends.cpu.get_cpu_capability()})"
    assert title in md.splitlines()[0]
    on_gpu = dict(result, machine=dict(result["machine"], device="cuda", gpu="a GPU", l2_bytes=1 << 20))
    assert "fits the GPU's L2" in markdown(on_gpu)


@pytest.fixture
def call_log(monkeypatch):
    """A list to which every sample round_robin times appends "timed" before its calls run
    (the providers append their own names)."""
    import bench.timing as timing

    log = []
    time_once = timing.time_once

    def logged_time_once(fn, calls, device):
        log.append("timed")
        return time_once(fn, calls, device)

    monkeypatch.setattr(timing, "time_once", logged_time_once)
    return log


@pytest.mark.parametrize("start", ["warm", "after-others"])
@pytest.mark.parametrize("providers", [("a", "b", "c"), ("a",)])
def test_round_robin_start(call_log, start, providers):
    # every call of a provider logs its name; every sample timed logs "timed" first
    log = call_log
    fns = {name: (lambda name=name: log.append(name)) for name in providers}
    rounds = 4
    res = round_robin(fns, "cpu", rounds, sample_s=1e-12, start=start)  # one call a sample
    assert all(r["calls"] == 1 and r["samples"] == rounds for r in res.values())
    calibration = len(fns) * (2 + 2 * 3)  # two calls, then three timed single calls, each
    rest = log[calibration:]
    timed = [rest[i + 1] for i, e in enumerate(rest) if e == "timed"]
    assert len(timed) == rounds * len(fns)
    for r in range(rounds):  # every provider once a round
        assert sorted(timed[r * len(fns):(r + 1) * len(fns)]) == sorted(providers)
    untimed = [i for i, e in enumerate(rest) if e != "timed" and (i == 0 or rest[i - 1] != "timed")]
    if start == "after-others":
        assert not untimed
        return
    # warm: each sample's timed call comes right after a call of the same provider, and an
    # untimed call runs only where another provider's call was the last one
    for i, e in enumerate(log):
        if e == "timed" and i >= calibration:
            assert log[i - 1] == log[i + 1], log[i - 2:i + 2]
    for i in untimed:
        prev = [e for e in log[:calibration + i] if e != "timed"][-1]
        assert prev != rest[i] and rest[i + 1] == "timed" and rest[i + 2] == rest[i]
    if len(fns) == 1:
        assert not untimed  # a lone provider always follows itself
    else:
        assert untimed


def test_round_robin_times_references_once_a_round(call_log, monkeypatch):
    # a reference (the 256 MB copy) is timed one call a sample in every round, shuffled in
    # among the providers and warmed as they are, and does not set the providers' calls a
    # sample: the slow reference would otherwise cut every provider's sample to one call.
    # The clock is a fake one that each call moves on by its own time.
    import bench.timing as timing

    log = call_log
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def call(name, ms):
        clock[0] += ms * 1e-3
        log.append(name)

    fns = {"a": lambda: call("a", 1.0), "b": lambda: call("b", 1.0)}
    rounds = 5
    res = round_robin(fns, "cpu", rounds, sample_s=4.5e-3, start="warm",
                      references={"ref": lambda: call("ref", 100.0)})
    assert res["a"]["calls"] == res["b"]["calls"] == 4  # 4 ms of 1 ms calls, not 1
    assert res["ref"]["calls"] == 1 and res["ref"]["samples"] == rounds
    assert res["ref"]["rounds_ms"] == [pytest.approx(100.0)] * rounds
    assert "ref" not in log[:len(fns) * (2 + 2 * 3)]  # no calibration calls
    timed = [log[i + 1] for i, e in enumerate(log) if e == "timed" and i >= len(fns) * 8]
    for r in range(rounds):
        assert sorted(timed[3 * r:3 * r + 3]) == ["a", "b", "ref"]
    for i, e in enumerate(log):  # warmed: a timed call follows one of its own
        if e == "timed" and i >= len(fns) * 8:
            assert log[i - 1] == log[i + 1]


def test_round_robin_rejects_unknown_start():
    with pytest.raises(ValueError, match="start"):
        round_robin({"a": lambda: None}, "cpu", 1, start="cold")
    with pytest.raises(ValueError, match="also providers"):  # a reference named as a provider
        round_robin({"a": lambda: None}, "cpu", 1, references={"a": lambda: None})


def test_round_robin_warms_for_warm_s(call_log, monkeypatch):
    # with warm_s, the untimed calls before a sample go on until warm_s has passed: a provider
    # whose calls take 1 ms makes 4 of them for 3.5 ms, then its sample. The clock is a fake
    # one that each call moves on by exactly 1 ms: on a busy machine a real 1 ms busy-wait was
    # sometimes descheduled for the whole 3.5 ms, and one call was then rightly enough.
    import bench.timing as timing

    log = call_log
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def slow(name):
        clock[0] += 1e-3
        log.append(name)

    fns = {"a": lambda: slow("a"), "b": lambda: slow("b")}
    rounds = 3
    round_robin(fns, "cpu", rounds, sample_s=1e-12, start="warm", warm_s=3.5e-3)
    calibration = len(fns) * (2 + 2 * 3)  # two calls, then three timed single calls, each
    rest = log[calibration:]
    runs = []  # (provider, untimed calls before its sample)
    i = 0
    while i < len(rest):
        j = i
        while rest[j] != "timed":
            j += 1
        runs.append((rest[j + 1], j - i))
        i = j + 2
    assert len(runs) == rounds * len(fns)
    prev = log[calibration - 1]
    for name, untimed in runs:
        if name == prev:
            assert untimed == 0  # its own call ran last: already warm
        else:
            assert untimed == 4, runs
        prev = name
    assert timing.warm_up(lambda: None, "cpu", 0.0) == 1  # one call at least


def test_wide_suite_names_every_case_once():
    # the wide scan (python -m bench --wide): shapes beyond issue 5's suite, each case named once
    # (group norm's group count in the name where it is not 32)
    import torch

    from bench.cases import suite

    cases = suite("cpu", [torch.float32, torch.bfloat16], wide=True)
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    assert "batch_norm 64x2048x7x7 infer fp32" in names
    assert "batch_norm 1x2048x7x7 cl infer bf16" in names
    assert "instance_norm 1x3x256x256 cl fwd bf16" in names
    assert "group_norm 4x256x16x16 g8 cl fwdbwd fp32" in names
    assert "group_norm 2x1280x8x8 cl fwdbwd fp32" in names
    assert "rms_norm 32768x80 fwdbwd bf16" in names  # a row's last chunk not whole
    assert not set(names) & {c.name for c in suite("cpu", [torch.float32, torch.bfloat16])}
