"""Plots for fragmentation reports (matplotlib, an optional dependency, imported only here)."""

from __future__ import annotations


def plot_timelines(rows: list[dict], out: str) -> None:
    """One panel per trace: live bytes (the trace's) and reserved bytes per allocator over op index."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("torchpool: --plot needs matplotlib (pip install matplotlib)") from None
    traces = list(dict.fromkeys(r["trace"] for r in rows))
    fig, axes = plt.subplots(len(traces), 1, figsize=(9, 3.2 * len(traces)), squeeze=False)
    for ax, name in zip(axes[:, 0], traces):
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
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
