#!/usr/bin/env python3
"""Benchmark torchpool against glibc, jemalloc, tcmalloc and mimalloc on the issue's workloads.

    python bench/bench_allocators.py                 # bench size, 3 interleaved repetitions
    python bench/bench_allocators.py --quick         # quick size, 2 repetitions (about a minute)
    python bench/bench_allocators.py --reps 5 --workloads W1,W3 \
        --tp-variant nohuge:huge_pages=0 --tp-variant populate:populate=1

Workloads (python/torchpool/cli/workloads.py):
  W1  torch.empty + fill_ + free, 90 % 1 KiB-1 MiB, 10 % 4-256 MiB     metric: touched GB/s (wall)
  W2  GPT-style training steps, random sequence lengths (AdamW)         metric: CPU s per step
  W3  CNN inference at batch 32, variable shapes, activations > 32 MiB  metric: CPU ms per image

Allocators: glibc (PyTorch's default CPU allocator on top of glibc malloc), torchpool (installed with
torchpool.install(**options) in the child before the workload), and jemalloc / tcmalloc / mimalloc
through LD_PRELOAD when their Debian packages (libjemalloc2, libtcmalloc-minimal4, libmimalloc2.0)
are installed; absent ones are skipped with a note.

Every measurement is a fresh interpreter. Repetitions are interleaved: for each repetition and each
workload, every allocator runs once, in an order rotated per repetition, so slow drifts of the shared
machine hit all allocators alike. Reported: medians of the workload loop's wall time and CPU time
(user + sys, all threads), the child's peak RSS, the workload's metric, and ratios against glibc from
the same run (speed-ups: > 1 is better than glibc; RSS: relative to the lowest peak RSS).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PRELOADS = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc2"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
    "mimalloc": ("libmimalloc.so.2", "libmimalloc2.0"),
}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
WORKLOADS = ("W1", "W2", "W3")
METRIC = {  # name, unit, function of the child's result, True when higher is better
    "W1": ("touched", "GB/s", lambda r: r["touched_gb_per_s"], True),
    "W2": ("cpu/step", "s", lambda r: r["cpu_s_per_step"], False),
    "W3": ("cpu/image", "ms", lambda r: 1e3 * r["cpu_s_per_image"], False),
}


# Idle OpenMP threads sleep instead of spinning. On a shared machine a spinning thread waits for its
# descheduled partner at full CPU: CPU time then measures the neighbours' load, not the allocator
# (W2 spread 0.9-16 s of CPU for the same work with the default policy). --omp-wait active restores it.
OMP_WAIT_POLICY = "PASSIVE"


def find_lib(name: str) -> str | None:
    for d in LIB_DIRS:
        hits = sorted(glob.glob(os.path.join(d, name + "*")))
        if hits:
            return hits[0]
    return None


# ------------------------------------------------------------------------------------------------
# child: one workload under one allocator, result as one JSON line
# ------------------------------------------------------------------------------------------------

def child(workload: str, size: str, tp_options: str | None, premapped: bool = False) -> int:
    import torch  # noqa: F401

    if tp_options is not None:
        import torchpool

        torchpool.install(**json.loads(tp_options))
        assert torchpool.is_installed()
    from torchpool.cli import workloads

    if premapped:
        result = workloads.alloc_mix(size, premapped=True)
    else:
        result = workloads.WORKLOADS[workload](size)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if tp_options is not None:
        import torchpool

        s = torchpool.memory_stats()
        result["tp_reserved_peak"] = s["reserved_bytes.all.peak"]
        result["tp_allocated_peak"] = s["allocated_bytes.all.peak"]
    for k in ("output_sums", "seq_lens", "sides"):
        result.pop(k, None)
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------

def parse_variant(text: str) -> tuple[str, dict]:
    """'name:k=v,k=v' -> ('torchpool[name]', {k: v})."""
    name, _, rest = text.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        opts[k.strip()] = v.strip()
    return f"torchpool[{name}]", opts


def run_one(alloc: dict, workload: str, size: str, timeout: float) -> dict:
    env = dict(os.environ)
    env.pop("TORCHPOOL_CONF", None)
    env.pop("LD_PRELOAD", None)
    if OMP_WAIT_POLICY:
        env["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    cmd = [sys.executable, os.path.abspath(__file__), "--child", workload, "--size", size]
    if alloc.get("preload"):
        env["LD_PRELOAD"] = alloc["preload"]
    if alloc.get("tp") is not None:
        cmd += ["--tp-options", json.dumps(alloc["tp"])]
    if alloc.get("premapped"):
        cmd += ["--premapped"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{alloc['name']} {workload} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def fmt_mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w[i]) if i > 1 else c.ljust(w[i]) for i, c in enumerate(cells))  # noqa: E731
    return "\n".join([line(headers), line(["-" * x for x in w])] + [line(r) for r in rows])


def spread(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) < 2 or med == 0:
        return ""
    return f"±{100 * (max(values) - min(values)) / 2 / med:.0f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="quick workload size and 2 repetitions")
    p.add_argument("--reps", type=int, default=None, help="repetitions per allocator and workload (default 3, quick 2)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of W1,W2,W3")
    p.add_argument("--allocators", default="glibc,torchpool,jemalloc,tcmalloc,mimalloc",
                   help="comma-separated subset of glibc,torchpool,jemalloc,tcmalloc,mimalloc")
    p.add_argument("--tp-options", default=None, help=argparse.SUPPRESS)  # child: install() options as JSON
    p.add_argument("--tp-variant", action="append", default=[],
                   help="extra torchpool configuration NAME:key=value,... (install() options), repeatable")
    p.add_argument("--omp-wait", choices=["passive", "active", "unset"], default="passive",
                   help="OMP_WAIT_POLICY of the children (default passive; see OMP_WAIT_POLICY above)")
    p.add_argument("--json", default=None, help="also write every raw measurement to this file")
    p.add_argument("--timeout", type=float, default=600, help="seconds per child")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--premapped", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-floor", action="store_true",
                   help="W1: skip the pre-mapped floor (the same fills into one buffer touched beforehand)")
    a = p.parse_args(argv)
    if a.child:
        return child(a.child, a.size, a.tp_options, a.premapped)

    global OMP_WAIT_POLICY
    OMP_WAIT_POLICY = None if a.omp_wait == "unset" else a.omp_wait.upper()
    size = "quick" if a.quick else "bench"
    reps = a.reps or (2 if a.quick else 3)
    workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}")
    allocs: list[dict] = []
    notes: list[str] = []
    for name in (n.strip() for n in a.allocators.split(",") if n.strip()):
        if name == "glibc":
            allocs.append({"name": "glibc"})
        elif name == "torchpool":
            allocs.append({"name": "torchpool", "tp": {}})
        elif name in PRELOADS:
            lib = find_lib(PRELOADS[name][0])
            if lib is None:
                notes.append(f"{name}: skipped, {PRELOADS[name][0]} not found (apt-get install {PRELOADS[name][1]})")
            else:
                allocs.append({"name": name, "preload": lib})
        else:
            p.error(f"unknown allocator {name!r}")
    for v in a.tp_variant:
        name, opts = parse_variant(v)
        allocs.append({"name": name, "tp": opts})
    if not any(x["name"] == "glibc" for x in allocs):
        allocs.insert(0, {"name": "glibc"})

    import platform

    print(f"bench_allocators: size={size} reps={reps} workloads={','.join(workloads)} "
          f"python={platform.python_version()} cpus={os.cpu_count()} OMP_WAIT_POLICY={OMP_WAIT_POLICY} "
          f"load={'/'.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    for x in allocs:
        desc = x.get("preload") or (f"install({', '.join(f'{k}={v}' for k, v in x['tp'].items())})" if "tp" in x else "default")
        print(f"  {x['name']}: {desc}", flush=True)
    for n in notes:
        print(f"  note: {n}", flush=True)

    floor = {"name": "premapped floor", "premapped": True}
    per_workload = {w: allocs + ([floor] if w == "W1" and not a.no_floor else []) for w in workloads}
    results: dict[tuple[str, str], list[dict]] = {}
    t_start = time.perf_counter()
    for rep in range(reps):
        for w in workloads:
            these = per_workload[w]
            k = rep % len(these)
            order = these[k:] + these[:k]
            for x in order:
                r = run_one(x, w, size, a.timeout)
                results.setdefault((w, x["name"]), []).append(r)
                print(f"  rep {rep + 1}/{reps} {w} {x['name']:<22} wall {r['wall_s']:7.3f} s  cpu {r['cpu_s']:7.3f} s  "
                      f"rss {fmt_mib(r['peak_rss'])} MiB", file=sys.stderr, flush=True)

    print(f"\n{reps} interleaved repetitions, {time.perf_counter() - t_start:.0f} s in all; medians; "
          "x glibc = glibc's median / this allocator's (higher is better); RSS vs lowest = peak RSS / lowest peak RSS\n")
    headers = ["workload", "allocator", "wall s", "cpu s", "peak RSS MiB", "metric", "wall x glibc", "cpu x glibc",
               "metric x glibc", "RSS vs lowest"]
    for w in workloads:
        mname, unit, mfun, higher = METRIC[w]
        med = {x["name"]: {
            "wall": statistics.median(r["wall_s"] for r in results[(w, x["name"])]),
            "cpu": statistics.median(r["cpu_s"] for r in results[(w, x["name"])]),
            "rss": statistics.median(r["peak_rss"] for r in results[(w, x["name"])]),
            "metric": statistics.median(mfun(r) for r in results[(w, x["name"])]),
        } for x in per_workload[w]}
        g = med["glibc"]
        low_rss = min(m["rss"] for n, m in med.items() if n != floor["name"])
        rows = []
        for x in per_workload[w]:
            m, rs = med[x["name"]], results[(w, x["name"])]
            mratio = (m["metric"] / g["metric"]) if higher else (g["metric"] / m["metric"])
            rows.append([w, x["name"],
                         f"{m['wall']:.3f} {spread([r['wall_s'] for r in rs])}",
                         f"{m['cpu']:.3f} {spread([r['cpu_s'] for r in rs])}",
                         fmt_mib(m["rss"]),
                         f"{m['metric']:.3g} {unit} {mname}",
                         f"{g['wall'] / m['wall']:.2f}", f"{g['cpu'] / m['cpu']:.2f}", f"{mratio:.2f}",
                         f"{m['rss'] / low_rss:.2f}"])
        print(table(headers, rows))
        if w == "W1" and floor["name"] in med:
            f = med[floor["name"]]["metric"]
            print("W1 touched GB/s as a fraction of the pre-mapped floor from the same run: " + ", ".join(
                f"{x['name']} {med[x['name']]['metric'] / f:.0%}" for x in allocs))
        if w == "W2":
            ref = results[(w, "glibc")][0]["losses"]
            same = [x["name"] for x in allocs if all(r["losses"] == ref for r in results[(w, x["name"])])]
            diff = [x["name"] for x in allocs if x["name"] not in same]
            print(f"W2 losses bit-identical to glibc: {', '.join(same)}" + (f"; DIFFER: {', '.join(diff)}" if diff else ""))
        if w == "W3":
            ref = results[(w, "glibc")][0]["output_digest"]
            diff = [x["name"] for x in allocs if any(r["output_digest"] != ref for r in results[(w, x["name"])])]
            print("W3 outputs identical to glibc: " + ("all" if not diff else f"all but {', '.join(diff)}"))
        print()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size": size, "reps": reps, "allocators": allocs,
                       "results": {f"{w}|{n}": rs for (w, n), rs in results.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
