"""Plots for fragmentation reports (matplotlib, an optional dependency, imported only here)."""

from __future__ import annotations

# Segment map colours: the bytes a live block's owner asked for, its rounding, blocks freed by their
# owner but still in use by another stream, and free or cached bytes of the segment.
COLORS = {"requested": "#1f5fa8", "rounding": "#e8a33d", "deferred": "#9c4fb0", "free": "#dddddd"}


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("torchpool: --plot needs matplotlib (pip install matplotlib)") from None
    return plt


def draw_segment_map(ax, segments: list[dict], title: str = "") -> None:
    """One horizontal bar per segment (largest first), its blocks coloured by what they hold."""
    segs = sorted(segments, key=lambda s: -s["total_size"])
    mib = float(1 << 20)
    for y, seg in enumerate(segs):
        base = seg["address"]
        bars = {k: [] for k in COLORS}
        for b in seg["blocks"]:
            x = (b["address"] - base) / mib
            w = b["size"] / mib
            if b["state"] == "allocated":
                req = min(b["requested_size"], b["size"]) / mib
                bars["requested"].append((x, req))
                if w > req:
                    bars["rounding"].append((x + req, w - req))
            elif b["state"] == "deferred":
                bars["deferred"].append((x, w))
            else:
                bars["free"].append((x, w))
        for kind, spans in bars.items():
            if spans:
                ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=COLORS[kind], edgecolor="none")
    from matplotlib.ticker import MaxNLocator

    ax.set_ylim(len(segs) - 0.5, -0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("offset in segment (MiB)")
    ax.set_ylabel("segment")
    total = sum(s["total_size"] for s in segs) / mib
    used = sum(b["requested_size"] for s in segs for b in s["blocks"] if b["state"] == "allocated") / mib
    ax.set_title(f"{title}\n{len(segs)} segments, {total:.0f} MiB, {used:.1f} MiB requested", fontsize=8)
    ax.tick_params(labelsize=7)


def plot_timelines(rows: list[dict], out: str) -> None:
    """One row of panels per trace: live bytes (the trace's) and reserved bytes per allocator over op
    index, then each allocator's segment map at its peak reserved where the rows carry one
    (replay(..., snapshots=True): torchpool modes and the PyTorch emulation)."""
    plt = _plt()
    from matplotlib.patches import Patch

    traces = list(dict.fromkeys(r["trace"] for r in rows))
    maps = {name: [r for r in rows if r["trace"] == name and r.get("_extra", {}).get("segments_at_peak")]
            for name in traces}
    cols = 1 + max((len(v) for v in maps.values()), default=0)
    fig, axes = plt.subplots(len(traces), cols, figsize=(9 + 3.2 * (cols - 1), 3.4 * len(traces)), squeeze=False,
                             gridspec_kw={"width_ratios": [3] + [1.1] * (cols - 1)})
    for row_axes, name in zip(axes, traces):
        ax = row_axes[0]
        live_drawn = False
        for r in (r for r in rows if r["trace"] == name):
            tl = r.get("_extra", {}).get("timeline") or []
            if not tl:
                continue
            ops = [x[0] for x in tl]
            if not live_drawn:
                ax.plot(ops, [x[1] / 2**20 for x in tl], color="black", lw=2, label="live (requested)")
                live_drawn = True
            ax.plot(ops, [x[2] / 2**20 for x in tl], lw=1, label=f"{r['allocator']} reserved")
        ax.set_title(name)
        ax.set_xlabel("operation")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=7, loc="upper left")
        for i, ax in enumerate(row_axes[1:]):
            if i < len(maps[name]):
                r = maps[name][i]
                draw_segment_map(ax, r["_extra"]["segments_at_peak"], f"{r['allocator']} at peak (op {r['_extra']['peak_reserved_op']})")
            else:
                ax.axis("off")
    if cols > 1:
        fig.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], loc="lower right", fontsize=8, ncol=4)
    fig.tight_layout(rect=(0, 0.03 if cols > 1 else 0, 1, 1))
    fig.savefig(out, dpi=90)
    plt.close(fig)
