"""Plots for fragmentation reports (matplotlib, an optional dependency, imported only here).

Note [Fragmentation figure]
---------------------------
One block of panels per trace: on top, reserved bytes over the trace for every allocator against
the trace's live bytes (a grey area); below, each allocator's segment map at its peak reserved.
Choices that keep it readable with ten allocators:
  * colours by family (torchpool modes blues/greens, the PyTorch emulation reds, system allocators
    purples/browns, dashed), each series also its own line style, lines 1.6 pt;
  * series that are identical over the whole trace are drawn once, labelled "a = b", so none hides
    another;
  * the legend sits outside the axes, right of the timeline, with each series' peak;
  * a segment map lays the segments end to end (largest first, a dark tick where each starts) and
    wraps them into rows of one size for every map of a trace, so area is bytes on one scale and a
    map of many small segments is as legible as one of two large ones;
  * bytes of a segment with no memory behind them (holes of an expandable segment, which
    Note [Expandable segments] unmaps) are drawn hatched as "unmapped";
  * text is at least 9 pt at the saved size.
"""

from __future__ import annotations

# Segment map colours: the bytes a live block's owner asked for, its rounding, blocks freed by their
# owner but still in use by another stream, free bytes of the segment, and address range of the
# segment with no memory mapped behind it.
COLORS = {"requested": "#1f5fa8", "rounding": "#e8a33d", "deferred": "#9c4fb0", "free": "#d9d9d9",
          "unmapped": "#ffffff"}
FONT = 9

# Timeline styles: (colour, line style) per allocator; families share a hue.
_STYLES = {
    "torchpool": ("#08519c", "-"), "torchpool-chunks-2m": ("#3182bd", "--"),
    "torchpool-segments": ("#6baed6", "-."), "torchpool-segments-no-target": ("#31a354", ":"),
    "torchpool-bestfit": ("#74c476", "--"), "torchpool-cuda": ("#006d2c", "-."),
    "torchpool-cuda-expandable": ("#005a32", ":"),
    "pytorch": ("#cb181d", "-"), "pytorch-expandable": ("#fc9272", "--"),
    "glibc": ("#54278f", (0, (5, 2))), "jemalloc": ("#9e9ac8", (0, (2, 2))),
    "tcmalloc": ("#8c6d31", (0, (6, 2, 1, 2))), "mimalloc": ("#d6a936", (0, (1, 1))),
}
_FALLBACK = ["#17becf", "#bcbd22", "#7f7f7f", "#e377c2", "#8c564b"]


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("torchpool: --plot needs matplotlib (pip install matplotlib)") from None
    return plt


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**20:.1f} MiB"


def style(name: str, i: int = 0) -> tuple[str, object]:
    return _STYLES.get(name) or (_FALLBACK[i % len(_FALLBACK)], "-")


def series(rows: list[dict]) -> list[dict]:
    """The reserved-bytes series of one trace's rows, identical ones merged: [{"names", "ops",
    "reserved", "peak"}] in row order."""
    out: list[dict] = []
    by_key: dict[tuple, dict] = {}
    for r in rows:
        tl = r.get("_extra", {}).get("timeline") or []
        if not tl:
            continue
        key = tuple((x[0], x[2]) for x in tl)
        if key in by_key:
            by_key[key]["names"].append(r["allocator"])
            continue
        s = {"names": [r["allocator"]], "ops": [x[0] for x in tl], "reserved": [x[2] for x in tl],
             "peak": r["peak_reserved_bytes"]}
        by_key[key] = s
        out.append(s)
    return out


def _segment_extent(seg: dict) -> int:
    return max(seg["total_size"], seg.get("extent", 0), sum(b["size"] for b in seg["blocks"]))


def map_row_bytes(segment_lists: list[list[dict]], rows: int = 16) -> int:
    """The bytes per row that fit the largest of these segment maps in about `rows` rows: a round
    number of MiB (1, 2 or 5 x 10^k), the same for every map of a trace so that areas compare."""
    most = max((sum(_segment_extent(s) for s in segs) for segs in segment_lists), default=1 << 20)
    target = most * 1.05 / rows / 2**20
    k = 1.0
    while True:
        for m in (1, 2, 5):
            if m * k >= target:
                return int(m * k * 2**20)
        k *= 10


def draw_segment_map(ax, segments: list[dict], title: str = "", row_bytes: int | None = None,
                     max_rows: int | None = None) -> None:
    """The segments (largest first) laid end to end and wrapped into rows of `row_bytes`, so that area
    is bytes on the same scale for every map drawn with the same row_bytes; blocks coloured by what
    they hold, the unmapped part of a block hatched, a dark tick where each segment starts."""
    segs = sorted(segments, key=lambda s: -_segment_extent(s))
    row_bytes = row_bytes or map_row_bytes([segs])
    mib = float(1 << 20)
    gap = row_bytes // 100
    bars = {k: [] for k in COLORS}
    starts = []

    def put(kind, start, width):
        while width > 0:  # split across rows
            r, off = divmod(start, row_bytes)
            w = min(width, row_bytes - off)
            bars[kind].append((r, off / mib, w / mib))
            start += w
            width -= w

    cursor = 0
    for seg in segs:
        base = seg["address"]
        starts.append(divmod(cursor, row_bytes))
        for b in seg["blocks"]:
            x = cursor + (b["address"] - base)
            if b["state"] == "allocated":
                req = min(b["requested_size"], b["size"])
                put("requested", x, req)
                put("rounding", x + req, b["size"] - req)
            elif b["state"] == "deferred":
                put("deferred", x, b["size"])
            else:
                mapped = min(b.get("mapped_size", b["size"]), b["size"])
                put("free", x, mapped)
                put("unmapped", x + mapped, b["size"] - mapped)  # where the holes lie is not recorded
        cursor += _segment_extent(seg) + gap
    for kind, spans in bars.items():
        by_row: dict[int, list] = {}
        for r, x, w in spans:
            by_row.setdefault(r, []).append((x, w))
        for r, xs in by_row.items():
            kw = ({"facecolors": COLORS[kind], "edgecolor": "#999999", "hatch": "////", "linewidth": 0.4}
                  if kind == "unmapped" else {"facecolors": COLORS[kind], "edgecolor": "none"})
            ax.broken_barh(xs, (r - 0.42, 0.84), **kw)
    for r, off in starts:
        ax.plot([off / mib, off / mib], [r - 0.48, r + 0.48], color="black", lw=1.0)
    used_rows = -(-cursor // row_bytes)
    ax.set_ylim((max_rows or used_rows) - 0.5, -0.5)
    ax.set_xlim(0, row_bytes / mib)
    ax.set_yticks([])
    ax.set_xlabel(f"MiB within a row (a row is {row_bytes / mib:g} MiB)", fontsize=FONT)
    total = sum(s["total_size"] for s in segs)
    used = sum(b["requested_size"] for s in segs for b in s["blocks"] if b["state"] == "allocated")
    ax.set_title(f"{title}\n{len(segs)} segment{'s' if len(segs) != 1 else ''}, {_mib(total)} mapped\n{_mib(used)} requested",
                 fontsize=FONT)
    ax.tick_params(labelsize=FONT)


def plot_timelines(rows: list[dict], out: str):
    """Note [Fragmentation figure]: per trace, reserved bytes per allocator over op index against the
    trace's live bytes, then each allocator's segment map at its peak reserved where the rows carry
    one (replay(..., snapshots=True): torchpool modes and the PyTorch emulation).  Returns the figure
    (closed)."""
    plt = _plt()
    from matplotlib.patches import Patch

    traces = list(dict.fromkeys(r["trace"] for r in rows))
    maps = {name: [r for r in rows if r["trace"] == name and r.get("_extra", {}).get("segments_at_peak")]
            for name in traces}
    cols = max(1, max((len(v) for v in maps.values()), default=0))
    heights = []
    for name in traces:
        heights += [3.2] + ([3.4] if maps[name] else [])
    fig = plt.figure(figsize=(max(14.0, 2.9 * cols + 3.0), sum(heights) + 0.6), layout="constrained")
    grid = fig.add_gridspec(len(heights), cols, height_ratios=heights)
    row = 0
    for name in traces:
        ax = fig.add_subplot(grid[row, :])
        row += 1
        trows = [r for r in rows if r["trace"] == name]
        tl = next((r["_extra"]["timeline"] for r in trows if r.get("_extra", {}).get("timeline")), None)
        if tl:
            ops = [x[0] for x in tl]
            live = [x[1] / 2**20 for x in tl]
            peak_live = trows[0]["peak_live_bytes"]
            ax.fill_between(ops, live, color="#bdbdbd", alpha=0.6, linewidth=0)
            ax.plot(ops, live, color="black", lw=1.4, label=f"live (requested), peak {_mib(peak_live)}")
            for i, s in enumerate(series(trows)):
                colour, ls = style(s["names"][0], i)
                ax.plot(s["ops"], [v / 2**20 for v in s["reserved"]], color=colour, linestyle=ls, lw=1.6,
                        label=f"{' = '.join(s['names'])}, peak {_mib(s['peak'])}")
        ax.set_title(f"{name}: reserved bytes per allocator (lines) vs live bytes (grey)", fontsize=FONT + 2)
        ax.set_xlabel("operation", fontsize=FONT)
        ax.set_ylabel("MiB", fontsize=FONT)
        ax.set_ylim(bottom=0)
        ax.margins(x=0.01)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=FONT)
        ax.legend(fontsize=FONT, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False, borderaxespad=0)
        if maps[name]:
            lists = [r["_extra"]["segments_at_peak"] for r in maps[name]]
            rb = map_row_bytes(lists)
            max_rows = max(-(-sum(_segment_extent(s) + rb // 100 for s in segs) // rb) for segs in lists)
            for i in range(cols):
                mx = fig.add_subplot(grid[row, i])
                if i >= len(maps[name]):
                    mx.axis("off")
                    continue
                r = maps[name][i]
                draw_segment_map(mx, r["_extra"]["segments_at_peak"],
                                 f"{r['allocator']} (op {r['_extra']['peak_reserved_op']})", rb, max_rows)
            row += 1
    if any(maps.values()):
        labels = {"requested": "requested bytes of live blocks", "rounding": "rounding of live blocks",
                  "deferred": "freed, in use by another stream", "free": "free (mapped)",
                  "unmapped": "unmapped (no memory behind it)"}
        fig.legend(handles=[Patch(facecolor=c, edgecolor="#999999", hatch="////" if k == "unmapped" else None,
                                  label=labels[k]) for k, c in COLORS.items()],
                   loc="outside lower center", fontsize=FONT, ncol=5, frameon=False)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig
