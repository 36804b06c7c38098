"""Fragmentation measures derived from the allocator's counters, and a readable report."""

from __future__ import annotations


def derive(raw: dict) -> dict:
    """Add the fragmentation measures to a raw stats dict (from Allocator.stats()).

    utilization             allocated / reserved (1.0 when nothing is reserved)
    internal_waste_bytes    allocated - requested: rounding to classes and unsplit remainders
    external_fragmentation  1 - largest free block / total free; 0 when nothing is free
    """
    s = dict(raw)
    allocated = s["allocated_bytes.all.current"]
    reserved = s["reserved_bytes.all.current"]
    requested = s["requested_bytes.all.current"]
    free = reserved - allocated
    s["utilization"] = allocated / reserved if reserved else 1.0
    s["internal_waste_bytes"] = allocated - requested
    s["external_fragmentation"] = (1.0 - s["largest_free_block"] / free) if free > 0 else 0.0
    s["cached_bytes"] = free
    peak_reserved = s["reserved_bytes.all.peak"]
    s["peak_utilization"] = s["allocated_bytes.all.peak"] / peak_reserved if peak_reserved else 1.0
    return s


def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def format_report(stats: dict, title: str = "torchpool memory", max_classes: int = 12, snapshot: list | None = None,
                  max_blocks: int = 8, sites: list | None = None, max_sites: int = 8) -> str:
    """A report a person can read: the gauges, the fragmentation measures, the busiest size classes;
    with `snapshot` (torchpool.memory_snapshot()) the largest live blocks, and with `sites`
    ([{"stack", "bytes", "blocks"}], e.g. torchpool.memory.live_sites()) the top allocation sites."""
    s = stats if "utilization" in stats else derive(stats)
    rows = []
    for name in ("allocated_bytes", "requested_bytes", "reserved_bytes", "inactive_split_bytes", "cached_class_bytes"):
        rows.append([name, fmt_bytes(s[f"{name}.all.current"]), fmt_bytes(s[f"{name}.all.peak"]),
                     fmt_bytes(s[f"{name}.all.allocated"])])
    out = [f"== {title} ==", format_table(["gauge", "current", "peak", "total allocated"], rows), ""]
    out.append(
        f"utilization {s['utilization']:.1%} (at the peaks {s['peak_utilization']:.1%})   internal waste {fmt_bytes(s['internal_waste_bytes'])}   "
        f"external fragmentation {s['external_fragmentation']:.1%}   largest free block {fmt_bytes(s['largest_free_block'])}"
    )
    out.append(
        f"segments {s['segment.all.current']} (peak {s['segment.all.peak']})   upstream maps {s['num_upstream_maps']}"
        f" / unmaps {s['num_upstream_unmaps']}   class hits {s['num_class_hits']} / misses {s['num_class_misses']}"
        f"   retries {s['num_alloc_retries']}   OOMs {s['num_ooms']}"
    )
    classes = sorted(s.get("size_classes", []), key=lambda c: -(c["hits"] + c["misses"]))[:max_classes]
    if classes:
        rows = []
        for c in sorted(classes, key=lambda c: c["bytes"]):
            allocs = c["hits"] + c["misses"]
            live_bytes = c["allocated_blocks"] * c["bytes"]
            waste = live_bytes - c["requested_bytes"]
            rows.append([fmt_bytes(c["bytes"]), allocs, f"{c['hits'] / allocs:.1%}" if allocs else "-",
                         c["allocated_blocks"], c["peak_allocated_blocks"], c["cached_blocks"],
                         fmt_bytes(waste) if c["allocated_blocks"] else "-"])
        out += ["", f"busiest size classes (of {len(s.get('size_classes', []))} used)",
                format_table(["class", "allocs", "hit rate", "live", "peak live", "parked", "live waste"], rows)]
    if snapshot is not None:
        out += _largest_blocks(snapshot, max_blocks)
    if sites:
        rows = [[fmt_bytes(x["bytes"]), x["blocks"], _short_site(x["stack"])] for x in sites[:max_sites]]
        out += ["", "top allocation sites (live bytes, sampled estimates)",
                format_table(["live", "blocks", "allocated at (innermost frame outside torch)"], rows)]
    return "\n".join(out)


def _largest_blocks(snapshot: list, limit: int) -> list[str]:
    blocks = [(b, seg) for seg in snapshot for b in seg["blocks"] if b["state"] == "allocated"]
    if not blocks:
        return ["", "largest live blocks: none"]
    blocks.sort(key=lambda bs: -bs[0]["size"])
    rows = []
    for b, seg in blocks[:limit]:
        frames = b.get("frames") or []
        rows.append([fmt_bytes(b["size"]), fmt_bytes(b["requested_size"]), f"0x{b['address']:x}",
                     f"{seg.get('segment_type', '?')} 0x{seg['address']:x}",
                     _short_site(frames) if frames else "-"])
    return ["", f"largest live blocks (of {len(blocks)})",
            format_table(["size", "requested", "address", "segment", "allocated at"], rows)]


def _short_site(stack: list[str]) -> str:
    """The innermost frame of a stack (innermost last) that is not inside torch or torchpool."""
    import os

    skip = []
    try:
        import torch

        skip.append(os.path.dirname(torch.__file__) + os.sep)
    except ImportError:  # pragma: no cover
        pass
    skip.append(os.path.dirname(__file__) + os.sep)
    for s in reversed(stack):
        if not s.startswith(tuple(skip)) or s.split(":", 1)[0].endswith("_demo.py"):
            return s
    return stack[-1] if stack else "-"
