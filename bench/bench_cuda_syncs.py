"""What the synchronization before unmaps costs (Note [Unmap after the stream], csrc/upstreams/cuda_driver.h),
counted on the fake driver's timeline (tests/fake_driver/fake_cuda.cc): no GPU needed.

Each trace of bench/traces is replayed through libtorchpool_cuda.so (the library torch would call) against
the fake driver; every allocated block is used by a fake kernel on its stream, and the "GPU" catches up
with the CPU every --lag trace events (the work queued since then completes).  Counted per configuration:
synchronizing calls (cuStreamSynchronize / cuEventSynchronize), those that found work still queued
("stalls": where a GPU would make the CPU wait for the queue to drain), cuMemFree calls (each
synchronizes the device, as cudaFree does), chunk unmaps, and hazards (must be 0).

    python bench/bench_cuda_syncs.py [--lag 64] [--traces bench/traces/*.tptrace.gz] [--json]
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAKE_SRC = HERE.parent / "tests" / "fake_driver" / "fake_cuda.cc"

CONFIGS = {
    "plain (cuMemAlloc segments)": "expandable_segments=0",
    "expandable, reserve target 1.05 (default)": "expandable_segments=1,reserve_bytes=68719476736",
    "expandable, no reserve target": "expandable_segments=1,reserve_bytes=68719476736,max_reserved_ratio=0",
}


def build_fake(out_dir: str) -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        sys.exit("bench_cuda_syncs: a C++ compiler is needed to build the fake driver")
    out = os.path.join(out_dir, "libfake_cuda.so")
    subprocess.run([cxx, "-std=c++20", "-O2", "-shared", "-fPIC", str(FAKE_SRC), "-o", out], check=True)
    return out


def replay(trace_path: str, conf: str, lag: int) -> dict:
    import numpy as np  # noqa: F401  (torchpool.trace needs it)
    import torchpool.cuda as tc
    from torchpool.tracing import trace as tt

    fake = ctypes.CDLL(os.environ["TORCHPOOL_CUDA_DRIVER"])
    fake.fake_cuda_launch.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t]
    fake.fake_cuda_calls.argtypes = [ctypes.c_char_p]
    fake.fake_cuda_calls.restype = ctypes.c_long
    fake.fake_cuda_set_capacity.argtypes = [ctypes.c_size_t]
    fake.fake_cuda_set_capacity(1 << 40)
    lib = tc._library()
    if lib.torchpool_cuda_reset_for_tests() != 0 or lib.torchpool_cuda_configure(conf.encode()) != 0:
        raise RuntimeError(tc._last_error())
    a = tc.CudaAllocator(0)
    t = tt.load(trace_path)
    live: dict[int, tuple[int, int]] = {}
    fake.fake_cuda_reset_calls()
    fake.fake_cuda_complete_all()
    allocs = 0
    for i, (op, addr, size, req, stream) in enumerate(zip(t.records["op"], t.records["addr"], t.records["size"],
                                                          t.records["requested"], t.records["stream"])):
        s = int(stream) + 0x10000  # distinct fake stream ids (0 would be the legacy stream)
        if op == 0:
            n = int(req or size)
            p = a.allocate(n, s)
            live[int(addr)] = (p, s)
            fake.fake_cuda_launch(s, p, n)
            allocs += 1
        elif op == 1 and int(addr) in live:
            p, s0 = live.pop(int(addr))
            a.free(p, s0)
        if lag and i % lag == lag - 1:
            fake.fake_cuda_complete_all()
    st = a.stats()
    res = {"allocs": allocs, "syncs": fake.fake_cuda_calls(b"sync"), "stalls": fake.fake_cuda_calls(b"stall"),
           "cuMemFree": fake.fake_cuda_calls(b"cuMemFree"), "chunk_unmaps": st["num_chunk_unmaps"],
           "segment_unmaps": st["num_upstream_unmaps"], "hazards": fake.fake_cuda_hazards()}
    for p, s in live.values():
        a.free(p, s)
    fake.fake_cuda_complete_all()
    a.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lag", type=int, default=64, help="trace events between GPU catch-ups (0: the GPU never lags)")
    ap.add_argument("--traces", nargs="*", default=sorted(glob.glob(str(HERE / "traces" / "*.tptrace.gz"))))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        trace, conf = json.loads(args.child)
        print(json.dumps(replay(trace, conf, args.lag)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, TORCHPOOL_CUDA_DRIVER=build_fake(d))
        env.pop("TORCHPOOL_CONF", None)
        for trace in args.traces:
            for name, conf in CONFIGS.items():
                r = subprocess.run([sys.executable, __file__, "--lag", str(args.lag), "--child", json.dumps([trace, conf])],
                                   capture_output=True, text=True, env=env, check=True)
                row = {"trace": Path(trace).name.split(".")[0], "config": name, **json.loads(r.stdout.splitlines()[-1])}
                rows.append(row)
                if not args.json:
                    print(f"{row['trace']:14s} {name:44s} allocs {row['allocs']:7d}  syncs {row['syncs']:5d}  "
                          f"stalls {row['stalls']:5d}  cuMemFree {row['cuMemFree']:5d}  chunk unmaps {row['chunk_unmaps']:5d}  "
                          f"hazards {row['hazards']}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
