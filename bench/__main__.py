"""python -m bench: run the suite side by side and report (table, JSON, markdown, PNG plot)."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time

import torch

import normkernels

from . import providers as P
from .cases import suite
from .timing import (CopyBandwidth, copy_step, gbps, paired_ratios, quartiles, round_robin,
                     steady_malloc)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MALLOC_MMAP_BYTES = 32 << 20  # glibc mmaps (and page-faults) fresh allocations this large


def machine(device: str) -> dict:
    info = {
        "device": device,
        "torch": torch.__version__,
        "normkernels": normkernels.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        # "in cache" on a GPU: the working set fits its L2 (the whole of it serves this run)
        info["l2_bytes"] = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        info["cpu"] = cpu_name()
        info["cpu_capability"] = normkernels.cpu_capability()
        # torch's own CPU kernels' SIMD level (ATEN_CPU_CAPABILITY caps both; ours alone is
        # capped by NORMKERNELS_CPU_CAPABILITY): a run standing in for an AVX2 machine says so
        get_aten = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
        if get_aten is not None:
            info["torch_cpu_capability"] = get_aten()
        info["llc_bytes"] = last_level_cache_bytes()
        info["private_cache_bytes"] = private_cache_bytes()
    return info


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo gives them:
    cloud guests often report a bare "AMD EPYC" for parts as different as Zen 3, 4 and 5."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def cpu_caches() -> list:
    """(level, bytes) of each cache cpu0 sees (Linux sysfs); empty where unknown."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        return []
    caches = []
    for entry in entries:  # index0..3, beside plain files such as uevent
        try:
            with open(os.path.join(base, entry, "level")) as f:
                level = int(f.read())
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        caches.append((level, int(text.rstrip("KMG")) * unit))
    return caches


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache, 0 where unknown."""
    return max((size for _, size in cpu_caches()), default=0)


def private_cache_bytes() -> int:
    """L2 size times the threads used: what this run surely has to itself. (VMs often report
    the host's whole shared L3, here 480 MB, of which our share is unknown.)"""
    l2 = [size for level, size in cpu_caches() if level == 2]
    return l2[0] * torch.get_num_threads() if l2 else 0


def pct_paired(traffic_bytes: int, ours_rounds_ms, copy_rounds_gbps) -> dict:
    """Ours' achieved GB/s as a percentage of the copy's GB/s of the same round: the median and
    quartiles over the rounds."""
    return quartiles([100 * gbps(traffic_bytes, ms) / copy_gbps
                      for ms, copy_gbps in zip(ours_rounds_ms, copy_rounds_gbps)])


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def run(args) -> dict:
    device = args.device
    dtypes = [DTYPES[d] for d in args.dtype.split(",")]
    cases = [c for c in suite(device, dtypes, args.quick, chain=args.chain,
                               wide=getattr(args, "wide", False))
             if re.search(args.filter, c.name)]
    if not cases:
        raise SystemExit(f"python -m bench: no case matches --filter {args.filter!r}"
                         + (" in the --quick suite" if args.quick else ""))
    names, notes = P.available(device, with_compile=not args.no_compile)
    info = machine(device)
    info["suite"] = "wide" if getattr(args, "wide", False) else "issue 5"
    info["malloc"] = "default"
    info["start"] = args.start
    if args.start == "warm":
        info["warm_ms"] = args.warm_ms
    if device == "cpu" and args.malloc == "steady":
        if steady_malloc():
            info["malloc"] = "steady"
        else:
            notes.append("--malloc steady: not a glibc C library here, default allocation kept")
    print(f"# normkernels bench on {info.get('gpu') or info.get('cpu')} ({device}), torch {info['torch']}, "
          f"{info['threads']} threads", file=sys.stderr)
    for n in notes:
        print(f"# {n}", file=sys.stderr)
    dram_copy = CopyBandwidth(device)
    print(f"# device-to-device copy (256 MB): {dram_copy.sample(15):.1f} GB/s now; timed again "
          "in every round of every case", file=sys.stderr)
    rows = []
    t_start = time.time()
    for i, case in enumerate(cases):
        fns = {}
        for name in names:
            fn = P.make(name, case, device)
            if fn is not None:
                fns[name] = fn
        # The per-case baseline: copying x's bytes, timed in the same round robin (so under the
        # same cache and machine conditions as the providers).
        x_bytes = case.numel * torch.empty((), dtype=case.dtype).element_size()
        fns["copy"] = copy_step(device, x_bytes)
        # The memory-bandwidth reference, a 256 MB copy, timed once a round among the providers:
        # its GB/s round by round pairs with ours' (a slow phase of the machine that slows both
        # cancels out of their ratio, as in the paired speedup).
        res = round_robin(fns, device, rounds=args.rounds, sample_s=10e-3 if device == "cpu" else 20e-3,
                          start=args.start, warm_s=args.warm_ms / 1e3,
                          references={"copy 256 MB": dram_copy.step})
        dram_rounds = dram_copy.add_rounds(res.pop("copy 256 MB")["rounds_ms"])
        t = {k: v["median_ms"] for k, v in res.items()}
        ours_gbs = gbps(case.traffic_bytes(), t["ours"])
        copy_gbs_case = gbps(2 * x_bytes, t["copy"])
        row = {
            "case": case.name,
            "family": case.family,
            "mode": case.mode,
            "dtype": str(case.dtype).replace("torch.", ""),
            "shape": list(case.shape),
            "layout": case.layout,
            "ms": t,
            "speedup_vs_torch": t["torch"] / t["ours"],
            "control_ratio": t["torch"] / t["torch (control)"],
            # torch / ours round by round: how consistent the speedup was within this run
            "speedup_vs_torch_paired": paired_ratios(res["torch"]["rounds_ms"], res["ours"]["rounds_ms"]),
            "ours_GBps": ours_gbs,
            "copy_GBps_same_size": copy_gbs_case,
            "pct_copy_bw": 100 * ours_gbs / copy_gbs_case,
            # ours' GB/s over the 256 MB copy's, round by round (median and quartiles)
            "pct_dram_copy_bw_paired": pct_paired(case.traffic_bytes(), res["ours"]["rounds_ms"],
                                                  dram_rounds),
            "fits_cache": case.working_set_bytes() <= info.get(
                "l2_bytes" if device == "cuda" else "private_cache_bytes", 0),
            "mmap_output": info["malloc"] == "default" and device == "cpu"
            and x_bytes >= MALLOC_MMAP_BYTES,
        }
        for peer in ("torch.compile", "liger"):
            if peer in t:
                row[f"speedup_vs_{peer}"] = t[peer] / t["ours"]
        rows.append(row)
        elapsed = time.time() - t_start
        print(f"[{i + 1}/{len(cases)}] {case.name}: torch {t['torch']:.3f} ms, ours {t['ours']:.3f} ms "
              f"({row['speedup_vs_torch']:.2f}x)  {elapsed:.0f}s", file=sys.stderr)
    info["copy_GBps"] = dram_copy.median()
    info["copy_GBps_range"] = [min(dram_copy.samples), max(dram_copy.samples)]
    info["copy_samples"] = len(dram_copy.samples)
    for row in rows:
        row["pct_dram_copy_bw"] = 100 * row["ours_GBps"] / info["copy_GBps"]
    summary = {
        "geomean_speedup_vs_torch": geomean([r["speedup_vs_torch"] for r in rows]),
        "slower_than_torch": [r["case"] for r in rows if r["speedup_vs_torch"] < 1.0],
        # slower than torch in 3 rounds of 4 or more: the upper quartile of the paired ratios below 1
        "slower_than_torch_paired_q3": [r["case"] for r in rows
                                        if r["speedup_vs_torch_paired"]["q3"] < 1.0],
        "paired_q1_below_1": [r["case"] for r in rows if r["speedup_vs_torch_paired"]["q1"] < 1.0],
        "control_ratio_median": sorted(r["control_ratio"] for r in rows)[len(rows) // 2] if rows else None,
        "control_ratio_range": [min(r["control_ratio"] for r in rows), max(r["control_ratio"] for r in rows)] if rows else None,
        "notes": notes,
    }
    if any("speedup_vs_torch.compile" in r for r in rows):
        summary["geomean_speedup_vs_compile"] = geomean([r.get("speedup_vs_torch.compile") for r in rows])
        summary["slower_than_compile"] = [r["case"] for r in rows if r.get("speedup_vs_torch.compile", 1) < 1.0]
    out_of_cache = [r for r in rows if not r["fits_cache"]]
    summary["out_of_cache_cases"] = len(out_of_cache)
    summary["out_of_cache_below_70pct_copy_bw"] = [r["case"] for r in out_of_cache if r["pct_copy_bw"] < 70]
    summary["out_of_cache_below_70pct_dram_copy_bw"] = [
        r["case"] for r in out_of_cache if r["pct_dram_copy_bw"] < 70]
    summary["out_of_cache_below_70pct_dram_copy_bw_paired"] = [
        r["case"] for r in out_of_cache if r["pct_dram_copy_bw_paired"]["median"] < 70]
    return {"machine": info, "summary": summary, "rows": rows, "args": vars(args)}


def markdown(result: dict) -> str:
    info, s, rows = result["machine"], result["summary"], result["rows"]
    has_chain = any(r["mode"] == "chain" for r in rows)
    has_compile = any("speedup_vs_torch.compile" in r for r in rows)
    has_liger = any("speedup_vs_liger" in r for r in rows)
    head = f"{info.get('gpu') or info.get('cpu')}, {info['device']}, torch {info['torch']}"
    if info.get("suite") == "wide":
        head = "wide scan (python -m bench --wide), " + head
    if "triton" in info:
        head += f", Triton {info['triton']}"
    if "cpu_capability" in info:
        head += f", kernels {info['cpu_capability']}"
        if "torch_cpu_capability" in info:
            head += f" (torch's {info['torch_cpu_capability']})"
        head += f", {info['threads']} threads"
    lines = [
        f"# normkernels benchmark — {head}",
        "",
        f"Copy bandwidth (device-to-device, 256 MB, same run): {info['copy_GBps']:.1f} GB/s, the "
        f"median of {info.get('copy_samples', 1)} samples taken through the run"
        + (f" (range {info['copy_GBps_range'][0]:.1f}–{info['copy_GBps_range'][1]:.1f})"
           if "copy_GBps_range" in info else "") + ". "
        "Times are medians of round-robin samples"
        + ({"warm": f", each sample just after {info.get('warm_ms', 0):g} ms of untimed calls of its "
            "own provider, one at least (--start warm: every timed call follows calls of its own, "
            "as in a loop of steps)",
            "after-others": ", each sample just after another provider's (--start after-others: "
            "a sample's first call runs from what the previous provider left in the caches)"}
           .get(info.get("start"), "")) + "; speedup = torch time / ours. "
        "Paired (IQR): the median and quartiles of torch / ours computed round by round (each "
        "pair timed in the same round, so a slow phase of the machine cancels out of its ratio). "
        "% copy BW: ours' achieved GB/s (minimum traffic: fwd reads x and writes y, bwd reads x "
        "and dy and writes dx" + (", chain is fwd and a read of y" if has_chain else "")
        + ") over the GB/s of copying x's bytes into an existing tensor, timed "
        "in the same round robin as the providers (for tensors that fit the last-level cache, "
        "that copy runs at cache speed); % 256 MB copy: the same over the 256 MB copy above, "
        "which goes to memory; paired: over the 256 MB copy timed in the same round (one in every "
        "round of every case, among the providers), the median and quartiles over the rounds, so a "
        "slow phase of the machine that slows both cancels out. In cache: the working set fits "
        + ("the GPU's L2." if info["device"] == "cuda" else "this run's private L2 caches.")
        + (" Memory: glibc kept from returning freed memory to the OS for the whole run (--malloc "
           "steady), so no provider page-faults on reused output memory: kernels are compared, not "
           "page faults." if info.get("malloc") == "steady" else "")
        + (" Memory: glibc defaults (--malloc default): a provider's step page-faults whenever "
           "glibc has handed the memory of its outputs back to the OS; ours come from "
           "normkernels' output pool." if info.get("malloc") == "default" and info["device"] == "cpu" else ""),
        "",
        "| case | torch ms | " + ("compile ms | " if has_compile else "") + ("liger ms | " if has_liger else "")
        + "ours ms | vs torch | paired (IQR) | " + ("vs compile | " if has_compile else "") + ("vs liger | " if has_liger else "")
        + "ours GB/s | % copy BW | % 256 MB copy | paired (IQR) | in cache | control |",
        "|---|---:|" + ("---:|" if has_compile else "") + ("---:|" if has_liger else "") + "---:|---:|---:|"
        + ("---:|" if has_compile else "") + ("---:|" if has_liger else "") + "---:|---:|---:|---:|:-:|---:|",
    ]
    for r in rows:
        t = r["ms"]
        cells = [r["case"] + (" ‡" if r["mmap_output"] else ""), f"{t['torch']:.3f}"]
        if has_compile:
            cells.append(f"{t.get('torch.compile', float('nan')):.3f}")
        if has_liger:
            cells.append(f"{t['liger']:.3f}" if "liger" in t else "—")
        pr = r.get("speedup_vs_torch_paired")
        cells += [f"{t['ours']:.3f}", f"{r['speedup_vs_torch']:.2f}x",
                  f"{pr['median']:.2f}x ({pr['q1']:.2f}–{pr['q3']:.2f})" if pr else "—"]
        if has_compile:
            cells.append(f"{r.get('speedup_vs_torch.compile', float('nan')):.2f}x")
        if has_liger:
            cells.append(f"{r['speedup_vs_liger']:.2f}x" if "speedup_vs_liger" in r else "—")
        dp = r.get("pct_dram_copy_bw_paired")
        cells += [f"{r['ours_GBps']:.1f}", f"{r['pct_copy_bw']:.0f}%", f"{r['pct_dram_copy_bw']:.0f}%",
                  f"{dp['median']:.0f}% ({dp['q1']:.0f}–{dp['q3']:.0f})" if dp else "—",
                  "yes" if r["fits_cache"] else "no",
                  f"{r['control_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"**Geometric mean speedup vs torch eager: {s['geomean_speedup_vs_torch']:.2f}x** over {len(rows)} cases"
        + (f"; vs torch.compile: {s['geomean_speedup_vs_compile']:.2f}x" if "geomean_speedup_vs_compile" in s else "")
        + ".",
        f"Cases slower than torch: {len(s['slower_than_torch'])}"
        + (" (" + ", ".join(s["slower_than_torch"]) + ")" if s["slower_than_torch"] else "") + ".",
    ] + ([
        f"Paired per round: slower than torch in 3 rounds of 4 or more (upper quartile below 1): "
        f"{len(s['slower_than_torch_paired_q3'])}"
        + (" (" + ", ".join(s["slower_than_torch_paired_q3"]) + ")" if s["slower_than_torch_paired_q3"] else "")
        + f"; in 1 round of 4 or more (lower quartile below 1): "
        f"{len(s['paired_q1_below_1'])}"
        + (" (" + ", ".join(s["paired_q1_below_1"]) + ")" if s["paired_q1_below_1"] else "") + ".",
    ] if "slower_than_torch_paired_q3" in s else []) + [
        f"Control (torch vs itself) ratio: median {s['control_ratio_median']:.2f}, range "
        f"{s['control_ratio_range'][0]:.2f}–{s['control_ratio_range'][1]:.2f}: the noise floor of this run.",
        f"Out-of-cache cases below 70% of the same-size copy: {len(s['out_of_cache_below_70pct_copy_bw'])} of "
        f"{s['out_of_cache_cases']}; below 70% of the 256 MB copy: "
        f"{len(s['out_of_cache_below_70pct_dram_copy_bw'])}"
        + (f"; below 70% of the 256 MB copy of the same round (paired median): "
           f"{len(s['out_of_cache_below_70pct_dram_copy_bw_paired'])}"
           if "out_of_cache_below_70pct_dram_copy_bw_paired" in s else "") + ".",
    ] + (["‡ output of 32 MB or more: glibc mmaps (and page-faults) each fresh allocation this large."]
         if any(r["mmap_output"] for r in rows) else []) + [f"Note: {n}." for n in s["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib not installed: no plot", file=sys.stderr)
        return False
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(10, max(4, 0.22 * len(rows))))
    ys = range(len(rows))
    sp = [r["speedup_vs_torch"] for r in rows]
    ax.barh(list(ys), sp, color=["tab:green" if v >= 1 else "tab:red" for v in sp])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([r["case"] for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup over torch eager (log scale)")
    info = result["machine"]
    ax.set_title(f"normkernels vs torch — {info.get('gpu') or info.get('cpu')} — geomean "
                 f"{result['summary']['geomean_speedup_vs_torch']:.2f}x", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32,bfloat16", help="comma list of float32, bfloat16, float16")
    p.add_argument("--filter", default="", help="regex on case names, e.g. 'batch_norm.*fwdbwd'")
    p.add_argument("--quick", action="store_true", help="fewer shapes and rounds, no torch.compile")
    p.add_argument("--chain", action="store_true",
                   help="also a 'chain' case after each forward: the forward, then y.sum() reading its "
                   "output, as the next layer would (--filter chain: those alone)")
    p.add_argument("--wide", action="store_true",
                   help="the wide scan instead of issue 5's suite: shapes beyond it (ResNet-50's "
                   "1024/2048-channel stages, 3-channel instance norm, short rows, few groups)")
    p.add_argument("--rounds", type=int, default=None, help="round-robin rounds per case (default 15, quick 5)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--malloc", default="steady", choices=["steady", "default"],
                   help="CPU: 'steady' keeps glibc from returning freed memory to the OS, so page "
                   "faults on fresh output memory are timed for no provider; 'default' leaves "
                   "glibc as a plain process has it")
    p.add_argument("--start", default="warm", choices=["warm", "after-others"],
                   help="what each timed sample follows: 'warm', untimed calls of the same "
                   "provider (--warm-ms; steady state, as in a loop of steps); 'after-others', whatever "
                   "provider ran before it in the round's random order")
    p.add_argument("--warm-ms", type=float, default=5.0,
                   help="--start warm: untimed calls of the provider before each of its samples "
                   "last at least this long (one call at least; default 5 ms: on a 2-vCPU Xeon "
                   "guest one call left a 10 MB forward 0.4 ms short of its steady state)")
    p.add_argument("--out", default=None, help="output prefix (default bench/results/<device>)")
    args = p.parse_args(argv)
    if args.quick:
        args.no_compile = True
    if args.rounds is None:
        args.rounds = 5 if args.quick else 15
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    result = run(args)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", args.device
                                   + ("-wide" if args.wide else "") + ("-quick" if args.quick else ""))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    md = markdown(result)
    print(md)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(md)
    wrote = [out + ".json", out + ".md"]
    if plot(result, out + ".png"):
        wrote.append(out + ".png")
    print("wrote " + ", ".join(wrote), file=sys.stderr)


if __name__ == "__main__":
    main()
