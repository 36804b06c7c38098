"""`torchpool bench fragmentation`: JSON rows for a given trace and allocators."""

import json
import subprocess
import sys

import pytest

from torchpool.tracing import trace as T


def test_bench_fragmentation_json(tmp_path):
    rec = T.make_records(4)
    rec["addr"] = [1, 2, 1, 2]
    rec["requested"] = [3 << 20, 1000, 3 << 20, 1000]
    rec["size"] = rec["requested"]
    rec["op"] = [0, 0, 1, 1]
    p = T.save(T.Trace(rec, {"name": "tiny"}), tmp_path / "tiny.tptrace.gz")
    r = subprocess.run([sys.executable, "-m", "torchpool", "bench", "fragmentation", "--trace", str(p),
                        "--allocators", "torchpool,pytorch", "--json", "--repeats", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["allocator"] for x in rows] == ["torchpool", "pytorch"]
    assert all(x["trace"] == "tiny" and x["peak_live_bytes"] == (3 << 20) + 1000 for x in rows)
    assert rows[1]["peak_reserved_bytes"] == 22 << 20  # 20 MiB buffer + 2 MiB small segment


def test_bench_unknown_allocator_fails_cleanly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torchpool", "bench", "fragmentation", "--allocators", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown allocator" in r.stderr


def test_installed_package_finds_the_trace_suite():
    # The wheel carries bench/traces; `torchpool bench fragmentation` with no --trace must find them
    # whether the package was installed from a wheel or in editable mode.
    from torchpool.cli.bench import suite_dir

    names = sorted(p.name for p in suite_dir().glob("*.tptrace.gz"))
    assert {"gpt_train.tptrace.gz", "cnn_infer.tptrace.gz", "kv_decode.tptrace.gz", "finetune_ckpt.tptrace.gz"} <= set(names)


def test_bench_plot_draws_timelines_and_segment_maps(tmp_path):
    pytest.importorskip("matplotlib")
    from torchpool.tracing import replay as R

    rec = T.make_records(6)
    rec["addr"] = [1, 2, 3, 1, 2, 3]
    rec["requested"] = [3 << 20, 1000, 700_000, 3 << 20, 1000, 700_000]
    rec["size"] = rec["requested"]
    rec["op"] = [0, 0, 0, 1, 1, 1]
    t = T.Trace(rec, {"name": "tiny"})
    rows = R.replay(t, ["torchpool", "pytorch", "glibc"], repeats=1, snapshots=True)
    maps = {r["allocator"]: r["_extra"]["segments_at_peak"] for r in rows}
    assert maps["glibc"] == []
    for name in ("torchpool", "pytorch"):
        row = next(r for r in rows if r["allocator"] == name)
        assert sum(s["total_size"] for s in maps[name]) == row["peak_reserved_bytes"]
    p = T.save(t, tmp_path / "tiny.tptrace.gz")
    out = tmp_path / "frag.png"
    r = subprocess.run([sys.executable, "-m", "torchpool", "bench", "fragmentation", "--trace", str(p),
                        "--allocators", "torchpool,pytorch", "--repeats", "1", "--plot", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w = matplotlib.image.imread(out).shape[:2]
    assert w > 1.5 * 9 * 90  # the timeline panel and two segment-map panels


def test_trace_cost_script_prints_the_three_modes():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_trace_cost.py"
    r = subprocess.run([sys.executable, str(script), "--workload", "cnn", "--steps", "1", "--repeats", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines() if ln.split()[:1] in (["none"], ["trace"], ["trace+stacks"])}
    assert set(rows) == {"none", "trace", "trace+stacks"}, r.stdout
    with_stack, allocs = rows["trace+stacks"][8].split("/")
    assert 0 < int(with_stack) <= int(allocs)
    assert int(rows["trace"][7]) > 0  # events recorded


def test_plot_is_readable(tmp_path):
    # issue 13: legends covered the data, 11 default-coloured thin lines, identical series hid each
    # other, segment maps on different x scales with 7-pt text, unmapped ranges not shown.
    pytest.importorskip("matplotlib")
    from torchpool.tracing import plots

    tl_a = [(0, 10 << 20, 20 << 20), (50, 30 << 20, 40 << 20), (99, 0, 40 << 20)]
    tl_b = [(0, 10 << 20, 22 << 20), (50, 30 << 20, 60 << 20), (99, 0, 60 << 20)]
    seg_small = [{"address": 1 << 40, "total_size": 2 << 20, "extent": 2 << 20,
                  "blocks": [{"address": 1 << 40, "size": 1 << 20, "requested_size": 1000, "state": "allocated"},
                             {"address": (1 << 40) + (1 << 20), "size": 1 << 20, "requested_size": 0, "state": "free",
                              "mapped_size": 1 << 20}]} for _ in range(12)]
    seg_exp = [{"address": 1 << 41, "total_size": 8 << 20, "extent": 32 << 20,
                "blocks": [{"address": 1 << 41, "size": 8 << 20, "requested_size": 8 << 20, "state": "allocated"},
                           {"address": (1 << 41) + (8 << 20), "size": 24 << 20, "requested_size": 0, "state": "free",
                            "mapped_size": 0}]}]

    def row(name, tl, segs=None):
        return {"trace": "t", "allocator": name, "peak_live_bytes": 30 << 20, "peak_reserved_bytes": max(x[2] for x in tl),
                "_extra": {"timeline": tl, "segments_at_peak": segs or [], "peak_reserved_op": 50}}

    rows = [row("torchpool", tl_a, seg_small), row("torchpool-segments-no-target", tl_a), row("pytorch", tl_b, seg_exp),
            row("glibc", tl_b[:2] + [(99, 0, 61 << 20)])]
    fig = plots.plot_timelines(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    timeline = fig.axes[0]
    labels = [ln.get_label() for ln in timeline.get_lines()]
    # identical series drawn once, named together; every other series its own line
    assert labels[0].startswith("live") and "torchpool = torchpool-segments-no-target, peak 40 MiB" in labels
    assert sum("pytorch" in x for x in labels) == 1 and any(x.startswith("glibc") for x in labels)
    styles = [(ln.get_color(), str(ln.get_linestyle())) for ln in timeline.get_lines()[1:]]
    assert len(set(styles)) == len(styles) and all(ln.get_linewidth() >= 1.4 for ln in timeline.get_lines())
    # the legend lies outside the data area
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the figure comes back closed
    canvas.draw()
    r = canvas.get_renderer()
    leg = timeline.get_legend().get_window_extent(r)
    assert leg.x0 >= timeline.get_window_extent(r).x1
    # segment maps: one scale for the trace, text >= 9 pt, unmapped bytes drawn (hatched)
    maps = [a for a in fig.axes[1:] if a.axison]
    assert len(maps) == 2 and maps[0].get_xlim() == maps[1].get_xlim()
    assert all(t.get_fontsize() >= 9 for a in maps for t in [a.title, a.xaxis.label] + a.get_xticklabels())
    hatched = [c for c in maps[1].collections if c.get_hatch()]
    assert hatched and sum(p.get_extents().width for c in hatched for p in c.get_paths()) > 0
    assert not [c for c in maps[0].collections if c.get_hatch()]
