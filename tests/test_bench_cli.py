"""`torchpool bench fragmentation`: JSON rows for a given trace and allocators."""

import json
import subprocess
import sys

import pytest

from torchpool import trace as T


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
    from torchpool.bench import suite_dir

    names = sorted(p.name for p in suite_dir().glob("*.tptrace.gz"))
    assert {"gpt_train.tptrace.gz", "cnn_infer.tptrace.gz", "kv_decode.tptrace.gz", "finetune_ckpt.tptrace.gz"} <= set(names)


def test_bench_plot_draws_timelines_and_segment_maps(tmp_path):
    pytest.importorskip("matplotlib")
    from torchpool import replay as R

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
