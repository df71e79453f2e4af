"""Per-family summary of a results JSON (used for the README): python -m bench.summarize FILE"""
from __future__ import annotations

import json
import math
import sys
from collections import defaultdict


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def summarize(path: str) -> str:
    with open(path) as f:
        result = json.load(f)
    rows, info, s = result["rows"], result["machine"], result["summary"]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["family"], r["mode"])].append(r)
    lines = [
        f"{info.get('gpu') or info.get('cpu')}, torch {info['torch']}, {info['threads']} threads"
        + (f", kernels {info['cpu_capability']}" if "cpu_capability" in info else "")
        + (f" (torch's {info['torch_cpu_capability']})" if "torch_cpu_capability" in info else "")
        + f"; copy bandwidth {info['copy_GBps']:.1f} GB/s"
        + (f" (median through the run, range {info['copy_GBps_range'][0]:.1f}–"
           f"{info['copy_GBps_range'][1]:.1f})" if "copy_GBps_range" in info else "")
        + f"; malloc {info.get('malloc', 'default')}.",
        "",
        "| family | mode | cases | geomean vs torch | min | max | geomean vs torch.compile |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (family, mode), rs in sorted(groups.items()):
        sp = [r["speedup_vs_torch"] for r in rs]
        comp = [r["speedup_vs_torch.compile"] for r in rs if "speedup_vs_torch.compile" in r]
        lines.append(
            f"| {family} | {mode} | {len(rs)} | {geomean(sp):.2f}x | {min(sp):.2f}x | {max(sp):.2f}x | "
            + (f"{geomean(comp):.2f}x |" if comp else "— |"))
    lines += [
        "",
        f"Overall: **{s['geomean_speedup_vs_torch']:.2f}x** geometric mean over {len(rows)} cases vs torch eager"
        + (f", {s['geomean_speedup_vs_compile']:.2f}x vs torch.compile" if "geomean_speedup_vs_compile" in s else "")
        + f"; {len(s['slower_than_torch'])} case{'' if len(s['slower_than_torch']) == 1 else 's'} "
        + "slower than torch" + (f" ({', '.join(s['slower_than_torch'])})" if s["slower_than_torch"] else "")
        + "; control ratio median "
        f"{s['control_ratio_median']:.2f} (range {s['control_ratio_range'][0]:.2f}–{s['control_ratio_range'][1]:.2f}).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else "bench/results/cpu.json"))
