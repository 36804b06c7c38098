#!/usr/bin/env python3
"""Multi-thread allocation microbench: 1, 2 and 4 threads allocating and freeing small and large blocks.

    python bench/bench_multithread.py                  # 3 interleaved repetitions
    python bench/bench_multithread.py --reps 1 --quick

Two paths, each at 1, 2 and 4 threads, for small (64 B-16 KiB, the size classes) and large
(256 KiB-8 MiB) blocks:
  raw    _C.churn: C++ threads without the GIL, each freeing the oldest of its live pointers and
         allocating the next size, with the first byte of each block written.  torchpool runs it on
         the allocator torchpool.install() makes (the CPU defaults); the others on malloc/free.
  torch  Python threads, each keeping a ring of live CPU tensors (torch.empty + one element written):
         what a DataLoader worker thread or an OpenMP region pays, interpreter included.
Allocators: torchpool (installed in the child; "torchpool:thread_cache=0;arenas=1" installs with those
options, to compare a choice in the same run), glibc (PyTorch's default CPU allocator), and
tcmalloc / jemalloc / mimalloc through LD_PRELOAD when their Debian packages are installed (absent
ones are skipped with a note).  Every measurement is a fresh interpreter; repetitions are interleaved
(each repetition runs every allocator once, in a rotated order) and the median counts.
Reported: operations (one free + one allocation) per second (raw: millions, torch: thousands), the
ratio to glibc and to
tcmalloc at the same thread count, and the scaling from 1 to N threads (ops/s at N / ops/s at 1).
The machine's core count bounds scaling: on 2 cores, 4 threads cannot exceed 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_allocators import OMP_WAIT_POLICY, PRELOADS, find_lib, table  # noqa: E402

THREADS = (1, 2, 4)
SIZES = {
    "small": [64, 192, 512, 1024, 3072, 4096, 8192, 16384, 256, 2048],
    "large": [256 << 10, 1 << 20, 3 << 20, 8 << 20, 512 << 10, 2 << 20],
}
LIVE = {"small": 64, "large": 8}
ITERS = {  # per thread: (raw, torch), full and --quick
    "small": ((400_000, 40_000), (100_000, 10_000)),
    "large": ((20_000, 4_000), (5_000, 1_000)),
}


def child(alloc: str, quick: bool) -> int:
    import torch

    if alloc.split(":")[0] == "torchpool":
        import torchpool

        # "torchpool:thread_cache=0" installs with options, e.g. to compare a choice in the same run
        opts = dict(kv.split("=", 1) for kv in alloc.split(":", 1)[1].split(";")) if ":" in alloc else {}
        tp = torchpool.install(**opts)
    else:
        tp = None
    from torchpool import _C

    out = {}
    for kind, sizes in SIZES.items():
        raw_iters, torch_iters = ITERS[kind][1 if quick else 0]
        for n in THREADS:
            # raw: C++ threads, no GIL
            _C.churn(n, max(1, raw_iters // 10), sizes, live=LIVE[kind], touch=True, allocator=tp)  # warm up
            s = _C.churn(n, raw_iters, sizes, live=LIVE[kind], touch=True, allocator=tp)
            out[f"raw/{kind}/{n}"] = n * raw_iters / s / 1e6
            # torch: Python threads creating tensors
            numels = sizes

            def work(iters: int, start: int) -> None:
                ring = [None] * LIVE[kind]
                for i in range(iters):
                    t = torch.empty(numels[(start + i) % len(numels)], dtype=torch.uint8)
                    t[0] = 1
                    ring[i % len(ring)] = t

            work(max(1, torch_iters // 10), 0)
            ts = [threading.Thread(target=work, args=(torch_iters, 7 * k)) for k in range(n)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            out[f"torch/{kind}/{n}"] = n * torch_iters / (time.perf_counter() - t0) / 1e3
    if tp is not None:
        err = tp.check()
        if err:
            raise SystemExit(f"torchpool check failed: {err}")
    print(json.dumps(out))
    return 0


def run_one(name: str, preload: str | None, quick: bool, timeout: float) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    if preload:
        env["LD_PRELOAD"] = preload
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name] + (["--quick"] if quick else [])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{name}: child failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median counts)")
    ap.add_argument("--quick", action="store_true", help="a quarter of the iterations")
    ap.add_argument("--allocators", default="torchpool,glibc,tcmalloc,jemalloc,mimalloc")
    ap.add_argument("--json", action="store_true", help="print the medians as JSON")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per child")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.quick)

    allocs = []
    for name in args.allocators.split(","):
        if name in PRELOADS:
            lib = find_lib(PRELOADS[name][0])
            if not lib:
                print(f"note: {name} skipped (install the Debian package {PRELOADS[name][1]})", file=sys.stderr)
                continue
            allocs.append((name, lib))
        elif name.split(":")[0] == "torchpool" or name == "glibc":
            allocs.append((name, None))
        else:
            ap.error(f"unknown allocator {name}")
    results: dict[str, list[dict]] = {name: [] for name, _ in allocs}
    for rep in range(args.reps):
        order = allocs[rep % len(allocs):] + allocs[:rep % len(allocs)]
        for name, lib in order:
            results[name].append(run_one(name, lib, args.quick, args.timeout))
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    if args.json:
        print(json.dumps(med, indent=1))
        return 0
    for path in ("raw", "torch"):
        for kind in SIZES:
            rows = []
            for name in med:
                row = [name]
                for n in THREADS:
                    v = med[name][f"{path}/{kind}/{n}"]
                    g = med.get("glibc", {}).get(f"{path}/{kind}/{n}")
                    t = med.get("tcmalloc", {}).get(f"{path}/{kind}/{n}")
                    row += [f"{v:.2f}", f"{v / g:.2f}" if g else "-", f"{v / t:.2f}" if t else "-"]
                base = med[name][f"{path}/{kind}/1"]
                row += [f"{med[name][f'{path}/{kind}/{n}'] / base:.2f}" for n in THREADS[1:]]
                rows.append(row)
            headers = ["allocator"]
            for n in THREADS:
                headers += [f"{n}T {'Mops/s' if path == 'raw' else 'kops/s'}", "x glibc", "x tcmalloc"]
            headers += [f"scale 1->{n}" for n in THREADS[1:]]
            print(f"\n{path} / {kind} ({'C++ threads, _C.churn' if path == 'raw' else 'Python threads, torch.empty'};"
                  f" {os.cpu_count()} CPUs; median of {args.reps})")
            print(table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
