"""Side-by-side timing on a shared, noisy machine.

Providers are timed round-robin, in a new random order each round, so that drifts in machine
load hit every provider alike; each sample times the same number of calls for every provider,
enough for the slowest one's sample to last sample_s, and the median sample is reported. A
control provider (torch against itself) shows the noise floor, and per-round paired ratios
(paired_ratios) how consistently one provider beat another.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import random
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable, calls: int, device: str) -> float:
    """Seconds per call over `calls` back-to-back calls."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def warm_up(fn: Callable, device: str, seconds: float) -> int:
    """Untimed calls of fn, back to back: at least one, and until `seconds` have passed.
    Returns how many ran."""
    t0 = time.perf_counter()
    calls = 0
    while calls == 0 or time.perf_counter() - t0 < seconds:
        fn()
        _sync(device)
        calls += 1
    return calls


def round_robin(fns: Dict[str, Callable], device: str, rounds: int, sample_s: float = 2e-3,
                seed: int = 0, start: str = "warm", warm_s: float = 0.0,
                references: Optional[Dict[str, Callable]] = None) -> Dict[str, Dict[str, float]]:
    """{provider: {median_ms, min_ms, samples, calls, rounds_ms}} timed side by side.

    Every provider's sample times the same number of back-to-back calls, enough for the slowest
    provider's sample to last ~sample_s. With calls per sample set by each provider's own speed,
    a fast provider averaged more warm calls into a sample than a slow one did, and a provider
    whose calibration call was slow got one call a sample: six copies of one 16x128x28x28
    forward timed side by side, the first calibrated (a one-off 3.4 ms single call) timed
    0.83 ms, the others 0.32. Equal counts, and the median of three single calls to calibrate,
    put every provider in the same mix of calls.

    references: timed in the same rounds (shuffled in among the providers, warmed as they are),
      one call a sample, and left out of setting the providers' calls a sample: the 256 MB
      copy, whose ~10 ms call would otherwise cut every provider's sample to one call. Their
      rounds_ms pair with the providers' round by round.

    start: what a sample starts from.
      "warm" (the default): untimed calls of the same provider just before its sample (one,
        and more until warm_s seconds have passed: warm_up), so every call timed follows calls
        of its own, as in a loop of steps: the caches and the memory system hold what the
        provider itself leaves there. A provider's time then no longer depends on which provider
        happened to run before it. One call was not enough on the Xeon guest: after the other
        providers of a case (each with its own x and y) had run, the channels_last 2x320x64x64
        fp32 group-norm forward of ours took 0.95, 0.71, 0.63, 0.57, 0.54 ms on the five calls
        after its warm call, torch's 0.76, 0.67, 0.63, 0.61, 0.65 ms (medians of 30 rounds);
        after 3-8 ms of its own calls, every call took 0.53-0.57 ms, torch's 0.61-0.64 ms. The
        L3 keeps what is reused, and torch's providers reuse each other's output: freed after
        each call, the same heap block serves torch, its control and torch.compile in turn, so
        it stays cached, while ours comes from normkernels' own pool, which only ours reuses
        (with that pool turned off, ours' first call took 0.64 ms instead of 0.91). A 10 MB
        copy after a 256 MB one took 0.86, then 0.74 ms, and 0.38 from its fourth call on.
        Before any warm call (there too), one channels_last 4x128x64x64 fp32 instance-norm
        forward of ours took 0.44-0.47 ms after its own call, 0.55-0.63 ms after a 64 MB copy
        had replaced the caches' contents, 0.72-0.89 ms
        after 8 ms with no memory traffic (both threads busy or not: the memory system winds
        down; 3 ms cost nothing) and 0.73-1.06 ms after torch's own 6-9 ms instance norm; its
        samples were one call long, so that case's time was mostly its predecessor's doing
        (1.07-1.12 ms in the suite).
      "after-others": no such call: the first call of a sample runs from whatever the previous
        provider (in this round's random order) left behind. On the 2-vCPU EPYC guest a
        channels_last 16x64x56x56 fp32 batch-norm forward+backward took 3.87 ms just after
        torch's and 2.78 ms just after its own."""
    if start not in ("warm", "after-others"):
        raise ValueError(f"round_robin: start must be 'warm' or 'after-others', not {start!r}")
    if set(references or {}) & set(fns):
        raise ValueError(f"round_robin: references {sorted(set(references) & set(fns))} are "
                         "also providers")
    rng = random.Random(seed)
    single = {}
    last = None  # the provider whose call ran last
    for name, fn in fns.items():
        fn(), fn()
        _sync(device)
        single[name] = statistics.median(time_once(fn, 1, device) for _ in range(3))
        last = name
    calls = max(1, min(1000, int(sample_s / max(max(single.values()), 1e-7))))
    timed = dict(fns, **(references or {}))
    sample_calls = {name: calls if name in fns else 1 for name in timed}  # references: one
    samples: Dict[str, List[float]] = {name: [] for name in timed}
    order = list(timed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            # warm: the untimed calls, unless this provider's own call just ran (a lone provider,
            # such as the 256 MB copy, or one that ended the last round and starts this one)
            if start == "warm" and name != last:
                warm_up(timed[name], device, warm_s)
            samples[name].append(time_once(timed[name], sample_calls[name], device))
            last = name
    return {
        name: {
            "median_ms": statistics.median(s) * 1e3,
            "min_ms": min(s) * 1e3,
            "samples": len(s),
            "calls": sample_calls[name],
            "rounds_ms": [x * 1e3 for x in s],  # one sample a round, in round order
        }
        for name, s in samples.items()
    }


def paired_ratios(rounds_a: List[float], rounds_b: List[float]) -> Dict[str, float]:
    """Per-round ratios a / b of two providers timed in the same rounds: each pair saw the same
    moment of the machine, so a slow phase that spans a round cancels out of its ratio. Returns
    the median and quartiles of those ratios and the rounds in which a was faster (ratio < 1)."""
    ratios = [a / b for a, b in zip(rounds_a, rounds_b)]
    return dict(quartiles(ratios), rounds_below_1=sum(x < 1 for x in ratios))


def quartiles(values: List[float]) -> Dict[str, float]:
    """{median, q1, q3, rounds} of per-round values."""
    if len(values) >= 2:
        q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:  # quantiles needs two points
        q1 = q2 = q3 = values[0] if values else float("nan")
    return {"median": q2, "q1": q1, "q3": q3, "rounds": len(values)}


def gbps(nbytes: float, ms: float) -> float:
    """GB/s of moving `nbytes` bytes in `ms` milliseconds."""
    return nbytes / (ms / 1e3) / 1e9


def copy_step(device: str, nbytes: int) -> Callable[[], object]:
    """One plain device-to-device copy of `nbytes` into an existing tensor: the bandwidth
    baseline (read + write of nbytes each)."""
    src = torch.empty(max(nbytes, 4) // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


class CopyBandwidth:
    """The memory-bandwidth reference: GB/s of a `nbytes` copy_step (256 MB: past any cache),
    sampled through the whole run rather than once. The machine's memory bandwidth moves with
    what else shares it (measured here: 30.5 and 35.6 GB/s at the start of two runs minutes
    apart), so one snapshot taken before the cases can sit well off the conditions they ran
    under; the median of samples taken through the run does not, and a copy timed in each
    round of a case (add_rounds) pairs with that round's samples."""

    def __init__(self, device: str, nbytes: int = 256 << 20):
        self.device, self.nbytes = device, max(nbytes, 4)
        self.step = copy_step(device, nbytes)
        self.samples: List[float] = []

    def gbps(self, ms: float) -> float:
        """GB/s of one copy that took `ms` milliseconds (read + write of nbytes)."""
        return gbps(2 * self.nbytes, ms)

    def sample(self, rounds: int = 3) -> float:
        """Times `rounds` copies now; returns their median GB/s (and keeps it)."""
        res = round_robin({"copy": self.step}, self.device, rounds)
        gbs = self.gbps(res["copy"]["median_ms"])
        self.samples.append(gbs)
        return gbs

    def add_rounds(self, rounds_ms: List[float]) -> List[float]:
        """Keeps the copies a case's round robin timed as its reference (one a round); returns
        their GB/s, round by round."""
        gbs = [self.gbps(ms) for ms in rounds_ms]
        self.samples.extend(gbs)
        return gbs

    def median(self) -> float:
        return statistics.median(self.samples)



def steady_malloc() -> bool:
    """Keeps glibc from handing freed memory back to the OS (no mmapped blocks, no heap trim),
    for the whole process: then every provider's outputs reuse freed memory instead of
    page-faulting fresh pages on each call, and the table compares kernels, not page faults.
    (By default glibc mmaps blocks of 32 MB or more and trims the heap, so a step of torch's
    can fault on its whole output; how often depends on what else the process allocates,
    normkernels' own output pool included.) False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
