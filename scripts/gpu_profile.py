"""Where a CUDA step's time goes: for a few benchmark cases, the GPU kernels one step of ours and
one of torch's launch (torch.profiler), with their device time per step, and the step's own time
(CUDA events). Answers what the benchmark table cannot: how many launches a step of ours makes,
and which of them costs what. Prints a table per case; run from the repository root:

    python3 scripts/gpu_profile.py [REGEX]      (REGEX filters the case names, as bench --filter)
"""
from __future__ import annotations

import collections
import os
import re
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import normkernels.functional as NF  # noqa: E402
import torch.nn.functional as TF  # noqa: E402
from bench.cases import Case, build  # noqa: E402

CASES = [
    Case("layer_norm", (16384, 1024), "fwd", torch.bfloat16),
    Case("layer_norm", (16384, 1024), "fwdbwd", torch.bfloat16),
    Case("group_norm", (8, 320, 64, 64), "fwd", torch.float32),
    Case("group_norm", (8, 320, 64, 64), "fwdbwd", torch.float32, "channels_last"),
    Case("batch_norm", (64, 64, 56, 56), "fwd", torch.float32),
    Case("batch_norm", (64, 64, 56, 56), "fwdbwd", torch.float32, "channels_last"),
    Case("batch_norm", (64, 256, 14, 14), "infer", torch.bfloat16),
]
STEPS = 10


def step_ms(fn) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(STEPS):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / STEPS


def kernels(fn) -> "collections.OrderedDict[str, list]":
    """kernel name -> [launches per step, device microseconds per step]"""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            fn()
        torch.cuda.synchronize()
    per = collections.OrderedDict()
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        name = re.sub(r"\s+", " ", e.name)[:70]
        entry = per.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += e.time_range.elapsed_us()  # a device event: its own span
    for entry in per.values():
        entry[0] /= STEPS
        entry[1] /= STEPS
    return per


def host_profile(fn, steps: int = 50, top: int = 12) -> str:
    """Where the host's time goes in `steps` steps (cProfile, by own time): for a step whose
    kernels leave the GPU idle, the Python and launch costs between them."""
    import cProfile
    import io
    import pstats

    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    return "\n".join(lines[2:])  # (past the header's totals line and sort note)


def main(pattern: str = "") -> None:
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; per step, mean of {STEPS}")
    for case in CASES:
        if not re.search(pattern, case.name):
            continue
        print(f"\n## {case.name}")
        for label, F in (("torch", TF), ("ours", NF)):
            fn = build(case, F, "cuda")
            ms = step_ms(fn)
            per = kernels(fn)
            launches = sum(v[0] for v in per.values())
            busy = sum(v[1] for v in per.values())
            print(f"{label}: {ms * 1e3:.1f} us a step, {launches:.0f} kernels, {busy:.1f} us of them")
            for name, (n, us) in sorted(per.items(), key=lambda kv: -kv[1][1]):
                print(f"    {us:8.1f} us  x{n:.0f}  {name}")
            if label == "ours" and case.mode == "fwdbwd":
                print(host_profile(fn))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
