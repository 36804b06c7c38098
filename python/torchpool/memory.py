"""torch.cuda-style memory queries for torchpool's allocators, built on torchpool.memory_stats().

    torchpool.memory_allocated()        # bytes in live tensors' blocks on the CPU ("cpu" is the default)
    torchpool.max_memory_allocated()    # the high-water mark since the start or reset_peak_stats()
    torchpool.memory_reserved(), torchpool.max_memory_reserved()
    print(torchpool.memory_summary())   # gauges, fragmentation, largest live blocks, top allocation sites
    torchpool.report_to_tracemalloc()   # tracemalloc sees live blocks (domain TRACEMALLOC_DOMAIN)

`device` is anything torch.device() takes, or an int (a CUDA ordinal, as in torch.cuda); None is the
CPU.  torchpool must serve or have served the device (torchpool.install()); otherwise these raise
rather than answer 0.  After uninstall() they keep describing torchpool's blocks still alive.
"""

from __future__ import annotations

import torch

from ._build import _C

TRACEMALLOC_DOMAIN: int = int(_C.monitor.tracemalloc_domain)


def _device(device) -> str:
    if device is None:
        return "cpu"
    if isinstance(device, int):
        return f"cuda:{device}"
    return str(torch.device(device))


def _stats(device) -> dict:
    from ._install import is_installed, memory_stats

    dev = _device(device)
    stats = memory_stats(dev)
    # memory_stats() stays readable after uninstall() (its numbers still describe torchpool's blocks);
    # but where torchpool never served the CPU, a 0 would read as "this program uses no memory".
    if dev == "cpu" and not is_installed(dev) and stats["allocation.all.allocated"] == 0:
        raise RuntimeError(
            "torchpool has not served the CPU in this process, so it has no memory figures: call "
            "torchpool.install() (or set TORCHPOOL_CONF=cpu=1) before the tensors you want counted"
        )
    return stats


def memory_allocated(device=None) -> int:
    """Bytes in allocated blocks (after rounding), as torch.cuda.memory_allocated()."""
    return int(_stats(device)["allocated_bytes.all.current"])


def max_memory_allocated(device=None) -> int:
    return int(_stats(device)["allocated_bytes.all.peak"])


def memory_reserved(device=None) -> int:
    """Bytes in segments held from the OS / driver, as torch.cuda.memory_reserved()."""
    return int(_stats(device)["reserved_bytes.all.current"])


def max_memory_reserved(device=None) -> int:
    return int(_stats(device)["reserved_bytes.all.peak"])


def live_sites(limit: int = 10) -> list[dict]:
    """The allocation sites holding the most live memory, from a running LeakDetector's samples
    (estimates): [{"stack": [...], "bytes": n, "blocks": k}]; [] when no detector runs."""
    if not _C.monitor.sampler_running():
        return []
    agg: dict[int, list[float]] = {}
    for stack, _birth, nbytes, count, _blocks in _C.monitor.sampler_live():
        a = agg.setdefault(stack, [0.0, 0.0])
        a[0] += nbytes
        a[1] += count
    top = sorted(agg.items(), key=lambda kv: -kv[1][0])[:limit]
    return [{"stack": list(_C.monitor.sampler_stack(sid)), "bytes": int(b), "blocks": int(round(c))} for sid, (b, c) in top]


def memory_summary(device=None, abbreviated: bool = False) -> str:
    """A readable report (torch.cuda.memory_summary()'s role): the gauges and fragmentation measures,
    then, unless abbreviated, the largest live blocks and the top allocation sites (when a
    LeakDetector is sampling stacks)."""
    from ._install import memory_snapshot
    from .stats import format_report

    dev = _device(device)
    stats = _stats(device)
    if abbreviated:
        return format_report(stats, title=f"torchpool memory summary ({dev})", max_classes=0)
    snapshot = memory_snapshot(dev)
    if dev == "cpu" and _C.monitor.sampler_running():  # sampled blocks carry their stacks
        stacks: dict[int, list[str]] = {}
        by_addr = {}
        for sid, _b, _n, _c, _k in _C.monitor.sampler_live():
            if sid not in stacks:
                stacks[sid] = list(_C.monitor.sampler_stack(sid))
            for addr, _size, _birth in _C.monitor.sampler_addresses(sid):
                by_addr[addr] = stacks[sid]
        for seg in snapshot:
            for b in seg["blocks"]:
                if b["state"] == "allocated" and b["address"] in by_addr:
                    b["frames"] = by_addr[b["address"]]
    return format_report(stats, title=f"torchpool memory summary ({dev})", snapshot=snapshot, sites=live_sites())


def report_to_tracemalloc(enable: bool = True) -> None:
    """Report torchpool's CPU blocks to tracemalloc in domain TRACEMALLOC_DOMAIN (Note [tracemalloc
    domain], csrc/bindings/monitor.cc), so tracemalloc-based tools see tensor memory:

        tracemalloc.start(); torchpool.report_to_tracemalloc()
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, torchpool.TRACEMALLOC_DOMAIN)])

    Off by default: with tracemalloc tracing, every allocation takes the GIL for a traceback.
    Blocks allocated before enabling are not reported."""
    _C.monitor.tracemalloc_enable(bool(enable))
