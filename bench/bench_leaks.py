"""What the leak detector costs: a training loop with and without torchpool.LeakDetector.

    .venv/bin/python bench/bench_leaks.py                      # GPT quick config, 3 repeats x 8 steps
    .venv/bin/python bench/bench_leaks.py --sample-kb 64,256,1024 --repeats 5

One process, torchpool installed, the modes interleaved (off, 256 KiB, off, ...; each repeat runs
every mode for `--steps` training steps with det.step() after each), so drift on a shared machine
hits all modes alike.  Reported: median step time per mode, its ratio to "off" (the median of the
per-repeat ratios against the off run of the same repeat; also in CPU time), samples taken per step, and whether a
planted leak (a 1 MiB tensor kept per step, last column) is found with that sampling.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import torchpool
from torchpool.cli import workloads
from torchpool.stats import fmt_bytes, format_table


def make_loop(seed: int = 0):
    cfg = workloads.GPT_CONFIGS["quick"]
    torch.manual_seed(seed)
    model = workloads.TinyGPT(cfg["vocab"], cfg["d_model"], cfg["heads"], cfg["layers"], cfg["max_len"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)

    def step():
        t = rng.randint(cfg["min_len"], cfg["max_len"])
        data = torch.randint(cfg["vocab"], (cfg["batch"], t + 1))
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg["vocab"]), data[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run(mode, step, steps: int, leak: bool = False) -> dict:
    """mode: None (off), an int (LeakDetector sample_bytes), "tm-idle" (report_to_tracemalloc() with
    tracemalloc not tracing: the cost of the hook alone) or "tm-tracing" (tracemalloc tracing too)."""
    import tracemalloc

    if isinstance(mode, str):
        torchpool.report_to_tracemalloc(True)
        if mode == "tm-tracing":
            tracemalloc.start(1)
    det = torchpool.LeakDetector(sample_bytes=mode) if isinstance(mode, int) else None
    kept = []
    s0 = torchpool._C.monitor.sampler_counts()[0]
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if leak:
            kept.append(torch.ones(1 << 18))  # 1 MiB per step
        if det:
            det.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = {"step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
           "samples": (torchpool._C.monitor.sampler_counts()[0] - s0) / steps}
    if isinstance(mode, str):
        torchpool.report_to_tracemalloc(False)
        tracemalloc.stop()
    if det:
        out["found"] = any("bench_leaks.py" in lk.site for lk in det.leaks()) if leak else None
        det.stop()
    return out


def per_sample_cost(n: int = 2000, repeats: int = 7) -> tuple[float, float]:
    """Microseconds per allocation+free of a 1.2 MB tensor (always sampled) without and with a detector:
    the cost of one sample (stack capture + bookkeeping), fastest of `repeats` (robust to load)."""
    def timed():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                torch.empty(300_000)
            best = min(best, time.perf_counter() - t0)
        return best / n * 1e6

    off = timed()
    det = torchpool.LeakDetector()
    on = timed()
    det.stop()
    return off, on


def _name(m) -> str:
    if m is None:
        return "off"
    if isinstance(m, int):
        return f"leaks, 1 per {fmt_bytes(m)}"
    return {"tm-idle": "tracemalloc hook, idle", "tm-tracing": "tracemalloc tracing"}[m]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tracemalloc", action="store_true", help="also time report_to_tracemalloc(), idle and tracing")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    p.add_argument("--sample-kb", default="64,256,1024", help="sampling intervals to compare (KiB)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torchpool.install()
    modes = [None] + [int(k) << 10 for k in args.sample_kb.split(",")]
    if args.tracemalloc:
        modes += ["tm-idle", "tm-tracing"]
    step = make_loop()
    for _ in range(3):
        step()  # warm-up
    res = {m: [] for m in modes}
    for rep in range(args.repeats):
        for m in modes:
            res[m].append(run(m, step, args.steps))
            print(f"repeat {rep + 1}/{args.repeats} {_name(m):>16s} "
                  f"{res[m][-1]['step_s'] * 1e3:.1f} ms/step", file=sys.stderr)
    found = {m: run(m, step, 12, leak=True)["found"] for m in modes if isinstance(m, int)}
    rows = []
    for m in modes:
        ratios = [r["step_s"] / b["step_s"] for r, b in zip(res[m], res[None])]
        cratios = [r["cpu_s"] / b["cpu_s"] for r, b in zip(res[m], res[None])]
        rows.append([_name(m),
                     f"{statistics.median(r['step_s'] for r in res[m]) * 1e3:.1f}",
                     f"{statistics.median(ratios):.3f}x", f"{min(ratios):.3f}x - {max(ratios):.3f}x",
                     f"{statistics.median(cratios):.3f}x",
                     f"{statistics.median(r['samples'] for r in res[m]):.0f}" if isinstance(m, int) else "-",
                     ("yes" if found[m] else "no") if m in found else "-"])
    print(format_table(["sampling", "ms/step (median)", "wall ratio (median)", "wall ratio range", "cpu ratio", "samples/step",
                        "1 MiB/step leak found"], rows))
    off, on = per_sample_cost()
    base = statistics.median(r["step_s"] for r in res[None])
    print(f"\none sample costs {on - off:.2f} us (alloc+free of an always-sampled tensor: {off:.2f} us off, {on:.2f} us on, "
          f"fastest of 7); at the median off step ({base * 1e3:.1f} ms) that is, per sampling:")
    for m in modes:
        if isinstance(m, int):
            k = statistics.median(r["samples"] for r in res[m])
            print(f"  1 per {fmt_bytes(m)}: {k:.0f} samples/step x {on - off:.2f} us = {k * (on - off) / 1e3:.2f} ms/step "
                  f"= {k * (on - off) / 1e6 / base:.2%} of the step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
