"""Replay through the Python front: rows, measures and errors."""

import numpy as np
import pytest

from torchpool import _C
from torchpool.tracing import replay as R
from torchpool.tracing import trace as T

MiB = 1 << 20


def _trace(sizes_per_step, steps=6, name="t"):
    rows, addr = [], 0x100000
    for s in range(steps):
        live = []
        for size in sizes_per_step(s):
            rows.append((addr, size, 0))
            live.append((addr, size))
            addr += 64 * MiB
        rows += [(a, n, 1) for a, n in live]
    rec = T.make_records(len(rows))
    rec["addr"] = [r[0] for r in rows]
    rec["size"] = [r[1] for r in rows]
    rec["requested"] = [r[1] for r in rows]
    rec["op"] = [r[2] for r in rows]
    return T.Trace(rec, {"name": name})


def test_rows_have_the_documented_keys_and_consistent_values():
    t = _trace(lambda s: [3 * MiB, 1000, 5000 + s])
    rows = R.replay(t, ["torchpool-segments", "pytorch", "pytorch-expandable"], repeats=1)
    assert [r["allocator"] for r in rows] == ["torchpool-segments", "pytorch", "pytorch-expandable"]
    for r in rows:
        assert set(R.public(r)) == set(R.ROW_KEYS)
        assert r["trace"] == "t"
        assert r["peak_live_bytes"] == 3 * MiB + 1000 + 5005
        assert r["utilization"] == pytest.approx(r["peak_live_bytes"] / r["peak_reserved_bytes"])
        assert 0 < r["utilization"] <= 1
        assert r["ops_per_s"] > 0 and r["upstream_calls"] >= 1
    by = {r["allocator"]: r for r in rows}
    # PyTorch puts a 3 MiB request in a 20 MiB buffer (kLargeBuffer) plus a 2 MiB small segment.
    assert by["pytorch"]["peak_reserved_bytes"] == 22 * MiB
    # torchpool with one mapping per segment rounds the large segment to the 2 MiB granularity: 4 MiB +
    # one 2 MiB small segment.
    assert by["torchpool-segments"]["peak_reserved_bytes"] == 6 * MiB
    assert by["pytorch-expandable"]["peak_reserved_bytes"] == 22 * MiB  # one 20 MiB page + 2 MiB small


def test_growing_sizes_fragment_the_pytorch_policy_more_than_expandable():
    # A KV-cache-like pattern: every step needs a slightly larger block than the last.
    t = _trace(lambda s: [12 * MiB + s * 3 * MiB, 11 * MiB + s * 3 * MiB], steps=8)
    by = {r["allocator"]: r for r in R.replay(t, ["pytorch", "pytorch-expandable"], repeats=1)}
    assert by["pytorch-expandable"]["peak_reserved_bytes"] < by["pytorch"]["peak_reserved_bytes"]


def test_timeline_and_snapshot_at_the_peak():
    t = _trace(lambda s: [2 * MiB, 300])
    rows = R.replay(t, ["torchpool"], repeats=1, timeline_points=5)
    tl = rows[0]["_extra"]["timeline"]
    assert len(tl) >= 5 and max(x[1] for x in tl) <= rows[0]["peak_live_bytes"]
    rt = R.compile_trace(t)
    segs = rt.snapshot_at("torchpool", rows[0]["_extra"]["peak_reserved_op"])
    assert sum(s["total_size"] for s in segs) == rows[0]["peak_reserved_bytes"]
    assert rt.info["allocs"] == 12 and rt.info["frees"] == 12 and rt.info["unmatched_frees"] == 0


def test_unknown_allocator_is_an_error_that_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: .*torchpool"):
        R.replay(_trace(lambda s: [100]), ["nope"])


def test_allocator_list_says_why_one_is_missing():
    names = {a["name"]: a for a in R.allocators()}
    assert {"torchpool", "pytorch", "pytorch-expandable", "glibc"} <= set(names)
    assert names["glibc"]["available"]
    for a in names.values():
        assert a["available"] or a["unavailable_reason"]


def test_emulation_invariants_hold_on_a_random_trace():
    rng = np.random.default_rng(0)
    rows, live, addr = [], [], 1
    for _ in range(3000):
        if live and rng.random() < 0.45:
            a, n = live.pop(int(rng.integers(len(live))))
            rows.append((a, n, 1))
        else:
            n = int(rng.integers(1, 40 * MiB)) if rng.random() < 0.2 else int(rng.integers(1, 200_000))
            rows.append((addr, n, 0))
            live.append((addr, n))
            addr += 1
    rec = T.make_records(len(rows))
    rec["addr"] = [r[0] for r in rows]
    rec["requested"] = [r[1] for r in rows]
    rec["size"] = rec["requested"]
    rec["op"] = [r[2] for r in rows]
    data = T.Trace(rec).to_bytes()
    assert _C.pytorch_policy_check(data, False) == ""
    assert _C.pytorch_policy_check(data, True) == ""


def test_system_allocators_report_measured_memory():
    ok, _ = R.available(["glibc", "tcmalloc", "mimalloc", "jemalloc"])
    t = _trace(lambda s: [8 * MiB, 100_000, 5000], steps=4)
    for r in R.replay(t, ok, repeats=1):
        assert r["external_fragmentation"] is None and r["upstream_calls"] is None
        assert r["peak_reserved_bytes"] > 0, r
        assert r["internal_waste_bytes"] >= 0


def test_glibc_reserved_covers_live_memory():
    # Note [Measuring system allocators]: blocks are written as they are allocated and glibc's
    # reserved bytes are the process's resident growth, measured in a fresh interpreter; reserved
    # can no longer come out below live (kv_decode read 23 MiB reserved for 30 MiB live before).
    from torchpool.cli.bench import suite_dir

    t = T.load(suite_dir() / "kv_decode.tptrace.gz")
    (r,) = R.replay(t, ["glibc"], repeats=1)
    assert r["peak_live_bytes"] > 25 * MiB
    assert r["utilization"] <= 1.0, r
    # Large blocks that are mapped fresh: every page must show up.
    big = _trace(lambda s: [24 * MiB, 40 * MiB], steps=3)
    (r,) = R.replay(big, ["glibc"], repeats=1)
    assert r["peak_reserved_bytes"] >= r["peak_live_bytes"], r


_SYSTEM_LIBS = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4", "mimalloc": "libmimalloc.so.2"}
_APT = "apt-get install libjemalloc2 libgoogle-perftools4 libmimalloc2.0"


def _installed(lib: str) -> bool:
    import ctypes.util
    import glob

    return bool(ctypes.util.find_library(lib.split(".so")[0].removeprefix("lib"))) or bool(
        glob.glob(f"/usr/lib/*/{lib}*") + glob.glob(f"/lib/*/{lib}*"))


@pytest.mark.parametrize("name", ["jemalloc", "tcmalloc", "mimalloc"])
def test_installed_system_allocators_are_not_skipped(name):
    # Note [Static TLS for system allocators]: jemalloc could not be dlopen'ed after torch ("cannot
    # allocate memory in static TLS block") and was skipped on every fresh machine.
    if not _installed(_SYSTEM_LIBS[name]):
        pytest.skip(f"{name} is not installed ({_APT})")
    ok, skipped = R.available([name])
    assert ok == [name], skipped
    t = _trace(lambda s: [8 * MiB, 100_000, 5000], steps=3)
    (r,) = R.replay(t, [name], repeats=1)
    assert r["allocator"] == name and r["peak_reserved_bytes"] >= r["peak_live_bytes"] > 0, r
    assert r["ops_per_s"] > 0


def test_bench_cli_runs_jemalloc_with_a_given_trace(tmp_path):
    if not _installed("libjemalloc.so.2"):
        pytest.skip(f"jemalloc is not installed ({_APT})")
    import json
    import subprocess
    import sys

    p = T.save(_trace(lambda s: [3 * MiB, 1000], steps=2), tmp_path / "t.tptrace.gz")
    r = subprocess.run([sys.executable, "-m", "torchpool", "bench", "fragmentation", "--trace", str(p), "--json",
                        "--repeats", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "jemalloc" in [row["allocator"] for row in json.loads(r.stdout)]
