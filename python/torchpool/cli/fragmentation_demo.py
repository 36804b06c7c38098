"""The fragmentation step of `torchpool demo`: record this run's allocations, replay them, report.

A short real workload (GPT-style training steps with random sequence lengths, then CNN inference on
variable shapes, torchpool.workloads at quick size) runs under torchpool with record_trace on; the
trace is replayed against torchpool's modes, the PyTorch caching-allocator emulation and glibc, and
the fragmentation table of `torchpool bench fragmentation` is printed.
"""

from __future__ import annotations

import pathlib
import time

GPT_STEPS = 4
CNN_BATCHES = 2


def allocators() -> list[str]:
    """torchpool and its modes, the PyTorch emulation (both settings), glibc: those available."""
    from ..tracing import replay

    names = [a["name"] for a in replay.allocators() if a["kind"] in ("torchpool", "emulation")] + ["glibc"]
    return replay.available(names)[0]


def run(workdir: pathlib.Path, out) -> dict:
    import torchpool
    from ..tracing import replay, trace
    from . import workloads
    from .bench import format_rows

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "demo_run.tptrace.gz"
    was_installed = torchpool.is_installed()
    if not was_installed:
        torchpool.install()
    t0 = time.perf_counter()
    try:
        with trace.record_trace(path, meta={"workload": "demo_run"}) as rec:
            workloads.gpt_train(size="quick", steps=GPT_STEPS)
            workloads.cnn_inference(size="quick", batches=CNN_BATCHES)
    finally:
        if not was_installed:
            torchpool.uninstall()
    record_s = time.perf_counter() - t0
    t = rec.trace
    t.header["name"] = "demo_run"
    t1 = time.perf_counter()
    rows = replay.replay(t, allocators(), repeats=1)
    replay_s = time.perf_counter() - t1
    print(f"recorded {len(t)} events ({t.count('alloc')} allocations) of {GPT_STEPS} training steps and "
          f"{CNN_BATCHES} inference batches under torchpool in {record_s:.1f} s -> {path.name}; "
          f"replayed in {replay_s:.1f} s:\n", file=out)
    print(format_rows(rows), file=out)
    best = max(rows, key=lambda r: r["utilization"] or 0)
    print(f"\nhighest utilization: {best['allocator']} ({best['utilization']:.1%}); measures defined in "
          "docs/reference/fragmentation.md; the full suite: torchpool bench fragmentation", file=out)
    return {"trace": str(path), "events": len(t), "rows": [replay.public(r) for r in rows],
            "record_s": record_s, "replay_s": replay_s}
