"""Shared by the bench/record_*.py scripts: record one workload's allocation trace with torchpool.

Each script runs a small real PyTorch workload on this machine's CPU with torchpool installed and
writes bench/traces/<name>.tptrace.gz (torchpool's trace format, torchpool/trace.py).  Seeds are
fixed, so a re-recording differs only in addresses and times.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import torchpool

TRACES = Path(__file__).resolve().parent / "traces"


def record(name: str, workload, description: str, **meta) -> Path:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=str(TRACES / f"{name}.tptrace.gz"))
    p.add_argument("--stacks", action="store_true", help="also record Python stacks (slower)")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    torchpool.install(arenas=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torchpool.record_trace(args.out, stacks=args.stacks,
                                meta={"workload": name, "description": description, **meta}) as rec:
        workload()
    secs = time.perf_counter() - t0
    tr = rec.trace
    print(f"{name}: {len(tr)} events ({tr.count('alloc')} allocs) in {secs:.1f} s, "
          f"peak live {tr.live_bytes().max() / 2**20:.1f} MiB -> {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB)")
    return Path(args.out)
