"""What recording a trace costs: a real workload with no recording, with record_trace, and with
record_trace(stacks=True) (Python stacks of allocations, Note [Python stacks of allocations] in
python/torchpool/tracing/trace.py).

    .venv/bin/python bench/bench_trace_cost.py                 # gpt_train quick, 4 steps, 3 repeats
    .venv/bin/python bench/bench_trace_cost.py --workload cnn --repeats 5

The three modes run interleaved (none, trace, stacks, none, trace, ...) in one process with torchpool
installed, so drift on a shared machine hits all of them alike.  "workload s" is the wall time of
the workload alone (record_trace started before, stopped after); "stop s" is the time stop() takes
to collect the events, attach the stacks and write the file.  Ratios: median over the median with
no recording (wall, cpu), fastest over fastest (min).  "events" counts the last repeat's records:
stacks=True runs every operator through a TorchDispatchMode, which changes some kernels' temporaries.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import torchpool
from torchpool.cli import workloads
from torchpool.stats import fmt_bytes, format_table
from torchpool.tracing.trace import record_trace

MODES = ["none", "trace", "trace+stacks"]


def workload(name: str, steps: int):
    if name == "gpt":
        return lambda: workloads.gpt_train(size="quick", steps=steps)
    if name == "cnn":
        return lambda: workloads.cnn_inference(size="quick", batches=steps)
    raise SystemExit(f"unknown workload {name!r} (gpt, cnn)")


def one(mode: str, fn, path: Path) -> dict:
    torch.manual_seed(0)
    rec = None
    if mode != "none":
        rec = record_trace(path, stacks=mode == "trace+stacks")
        rec.start()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"wall": wall, "cpu": cpu, "stop": 0.0, "events": 0, "stacks": 0, "with_stack": 0, "bytes": 0}
    if rec is not None:
        t1 = time.perf_counter()
        tr = rec.stop()
        out.update(stop=time.perf_counter() - t1, events=len(tr), stacks=len(tr.header.get("stacks", [])),
                   with_stack=len(tr.header.get("event_stacks", [])), allocs=tr.count("alloc"),
                   bytes=path.stat().st_size)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="gpt", help="gpt (training steps) or cnn (inference batches)")
    p.add_argument("--steps", type=int, default=4, help="training steps / inference batches")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torchpool.install()
    fn = workload(args.workload, args.steps)
    fn()  # warm-up: first-touch of the pool, lazy inits
    res = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for m in MODES:
                res[m].append(one(m, fn, Path(tmp) / f"{m}.tptrace.gz"))
                print(f"repeat {rep + 1}/{args.repeats} {m:13s} {res[m][-1]['wall']:.2f} s", file=sys.stderr)
    base = statistics.median(r["wall"] for r in res["none"])
    base_cpu = statistics.median(r["cpu"] for r in res["none"])
    base_min = min(r["wall"] for r in res["none"])
    rows = []
    for m in MODES:
        rs = res[m]
        wall = statistics.median(r["wall"] for r in rs)
        cpu = statistics.median(r["cpu"] for r in rs)
        last = rs[-1]
        rows.append([m, f"{wall:.2f}", f"{min(r['wall'] for r in rs):.2f}", f"{wall / base:.2f}x",
                     f"{min(r['wall'] for r in rs) / base_min:.2f}x", f"{cpu / base_cpu:.2f}x",
                     f"{statistics.median(r['stop'] for r in rs):.2f}", last["events"] or "-",
                     f"{last['with_stack']}/{last.get('allocs', 0)}" if m == "trace+stacks" else "-",
                     fmt_bytes(last["bytes"]) if last["bytes"] else "-"])
    print(f"workload: {args.workload} quick, {args.steps} {'steps' if args.workload == 'gpt' else 'batches'}; "
          f"{args.repeats} interleaved repeats; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(format_table(["mode", "workload s (median)", "min", "wall ratio", "min ratio", "cpu ratio", "stop s", "events",
                        "allocs with stack", "file"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
