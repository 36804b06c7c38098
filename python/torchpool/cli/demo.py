"""`torchpool demo`: swap the allocator, run real workloads, lazily load a checkpoint, report.

Each allocator runs the same workload in a fresh interpreter (so peak RSS and timings are its own):
first PyTorch's default CPU allocator, then torchpool installed through TORCHPOOL_CONF. The parent
prints both side by side, then torchpool's statistics and fragmentation report, then the steps that
other components add (lazy checkpoint under a memory budget, fragmentation replay).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..stats import fmt_bytes, format_report, format_table

# Demo steps other components provide: module -> title. Each has run(workdir, out) -> dict.
STEPS = {
    "torchpool.cli.loader_demo": "lazy checkpoint under a memory budget",
    "torchpool.cli.fragmentation_demo": "fragmentation of this run's allocations, replayed",
    "torchpool.cli.leak_demo": "a planted leak, found by torchpool.LeakDetector",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=["quick", "bench"], default="quick", help="workload size (default quick)")
    p.add_argument("--workdir", default=None, help="where generated files go (default: a temporary directory)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def _child(size: str) -> int:
    """Runs in a fresh interpreter: the workload under whatever allocator TORCHPOOL_CONF chose."""
    import torch

    import torchpool
    from torchpool.cli import workloads

    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    train = workloads.gpt_train(size=size)
    cnn = workloads.cnn_inference(size=size)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    result = {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "losses": train["losses"],
        "images_per_s": cnn["images_per_s"],
        "torchpool": torchpool.is_installed(),
    }
    if torchpool.is_installed():
        result["stats"] = torchpool.memory_stats()
    print(json.dumps(result))
    return 0


def _run_child(size: str, conf: str | None) -> dict:
    env = dict(os.environ)
    env.pop("TORCHPOOL_CONF", None)
    if conf:
        env["TORCHPOOL_CONF"] = conf
    r = subprocess.run([sys.executable, "-m", "torchpool", "demo", "--child", "--size", size],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"torchpool demo: the workload failed under {conf or 'the default allocator'}:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> int:
    if args.child:
        return _child(args.size)
    out = sys.stdout
    print("torchpool demo: a GPT-style training run (random sequence lengths) and a CNN inference run "
          "(variable shapes, batch 32), first under PyTorch's default CPU allocator, then under torchpool.\n", file=out)
    default = _run_child(args.size, None)
    pooled = _run_child(args.size, "cpu=1")
    rows = []
    for name, r in (("default (glibc)", default), ("torchpool", pooled)):
        rows.append([name, f"{r['wall_s']:.2f} s", f"{r['cpu_s']:.2f} s", fmt_bytes(r["peak_rss"]),
                     f"{r['images_per_s']:.1f}" if r.get("images_per_s") else "-"])
    print(format_table(["allocator", "wall", "cpu (user+sys)", "peak RSS", "CNN images/s"], rows), file=out)
    same = default["losses"] == pooled["losses"]
    print(f"\nspeed-up: wall {default['wall_s'] / pooled['wall_s']:.2f}x, cpu {default['cpu_s'] / pooled['cpu_s']:.2f}x; "
          f"training losses {'bit-identical' if same else 'DIFFER'} under both allocators "
          f"(final loss {pooled['losses'][-1]:.4f})\n", file=out)
    print(format_report(pooled["stats"], title="torchpool statistics after the workload"), file=out)
    with tempfile.TemporaryDirectory(prefix="torchpool-demo-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for module, title in STEPS.items():
            if importlib.util.find_spec(module) is None:
                continue
            print(f"\n== {title} ==", file=out)
            importlib.import_module(module).run(workdir, out)
    return 0 if same else 1
