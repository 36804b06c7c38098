"""Statistics kept as the allocator goes agree with what a walk of its segments finds."""

import json
import random
import textwrap
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchpool
from torchpool import _C

UPSTREAMS = ["fake", "host", "host_vmm"]


def recompute(snapshot: list[dict]) -> dict:
    """The gauges, recomputed from a memory_snapshot()."""
    out = dict(allocated=0, requested=0, reserved=0, inactive_split=0, allocations=0, segments=0, largest_free=0)
    for seg in snapshot:
        out["reserved"] += seg["total_size"]
        out["segments"] += 1
        split = len(seg["blocks"]) > 1
        for b in seg["blocks"]:
            if b["state"] == "allocated":
                out["allocated"] += b["size"]
                out["requested"] += b["requested_size"]
                out["allocations"] += 1
            else:
                # the free memory held: a free block of an expandable segment may span unmapped chunks
                out["largest_free"] = max(out["largest_free"], b["mapped_size"])
                if split:
                    out["inactive_split"] += b["size"]
    return out


def assert_stats_match_snapshot(alloc):
    s = torchpool.stats.derive(alloc.stats())
    r = recompute(alloc.snapshot())
    assert s["allocated_bytes.all.current"] == r["allocated"]
    assert s["requested_bytes.all.current"] == r["requested"]
    assert s["reserved_bytes.all.current"] == r["reserved"]
    assert s["inactive_split_bytes.all.current"] == r["inactive_split"]
    assert s["allocation.all.current"] == r["allocations"]
    assert s["segment.all.current"] == r["segments"]
    assert s["largest_free_block"] == r["largest_free"]
    free = r["reserved"] - r["allocated"]
    assert s["utilization"] == pytest.approx(r["allocated"] / r["reserved"] if r["reserved"] else 1.0)
    assert s["internal_waste_bytes"] == r["allocated"] - r["requested"]
    assert s["external_fragmentation"] == pytest.approx(1 - r["largest_free"] / free if free else 0.0)


sizes = st.one_of(st.integers(1, 4096), st.integers(4097, 1 << 20), st.integers((1 << 20) + 1, 48 << 20))
ops = st.lists(st.tuples(st.booleans(), sizes, st.integers(0, 10**6)), min_size=1, max_size=120)


@settings(max_examples=60, deadline=None)
@given(ops=ops, upstream=st.sampled_from(UPSTREAMS), size_classes=st.booleans(), max_cached=st.sampled_from([None, 0, 8 << 20]),
       thread_cache=st.booleans())
def test_random_alloc_free_keeps_invariants(ops, upstream, size_classes, max_cached, thread_cache):
    opts = {"size_classes": size_classes, "thread_cache": thread_cache}
    if max_cached is not None:
        opts["max_cached_bytes"] = max_cached
    a = torchpool.Allocator(upstream, **opts)
    live = []
    for is_alloc, size, pick in ops:
        if is_alloc or not live:
            p = a.allocate(size)
            assert p % 64 == 0
            block, requested = a.block_size(p)
            assert requested == size and block >= size
            live.append(p)
        else:
            a.free(live.pop(pick % len(live)))
        assert a.check() == ""
    assert_stats_match_snapshot(a)
    for p in live:
        a.free(p)
    assert a.stats()["allocated_bytes.all.current"] == 0
    a.empty_cache()
    assert a.stats()["reserved_bytes.all.current"] == 0
    assert a.check() == ""


@pytest.mark.parametrize("thread_cache", [0, 1])
def test_stats_match_snapshot_after_torch_workload(python_subprocess, thread_cache):
    r = python_subprocess(textwrap.dedent(f"""
        import json, random, torch, torchpool
        torchpool.install(arenas=1, thread_cache={thread_cache})
        rng = random.Random(0)
        keep = []
        for step in range(400):
            n = rng.choice([rng.randint(1, 2000), rng.randint(2000, 300000), rng.randint(300000, 3000000)])
            t = torch.empty(n, dtype=torch.float32).fill_(1.0)
            if rng.random() < 0.5:
                keep.append(t)
            if keep and rng.random() < 0.4:
                keep.pop(rng.randrange(len(keep)))
        a = torchpool.allocator()
        print(json.dumps({{"stats": a.stats(), "snapshot": a.snapshot(), "check": a.check()}}))
        """))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["check"] == ""

    class Frozen:
        def stats(self):
            return out["stats"]

        def snapshot(self):
            return out["snapshot"]

    assert_stats_match_snapshot(Frozen())
    assert out["stats"]["num_class_hits"] > 0


def test_peaks_totals_and_reset():
    a = torchpool.Allocator("fake")
    p = a.allocate(10 << 20)
    q = a.allocate(1000)
    a.free(p)
    s = a.stats()
    assert s["allocated_bytes.all.peak"] >= (10 << 20) + 1024
    assert s["allocated_bytes.all.current"] == 1024
    assert s["allocated_bytes.all.allocated"] - s["allocated_bytes.all.freed"] == s["allocated_bytes.all.current"]
    a.reset_peak_stats()
    assert a.stats()["allocated_bytes.all.peak"] == 1024
    a.free(q)


def test_size_class_table_from_python():
    table = _C.size_class_table()
    assert len(table) == _C.num_size_classes
    assert _C.small_request_limit == table[-1][1] == 1 << 20  # the largest class, not the max_class_bytes option
    for size in [1, 63, 64, 65, 1000, 1025, 4097, 100_000, 1 << 20]:
        idx = _C.class_of(size)
        assert table[idx][1] >= size
        assert idx == 0 or table[idx - 1][1] < size
    with pytest.raises(ValueError):
        _C.class_of((1 << 20) + 1)


def test_per_class_table_counts_hits():
    a = torchpool.Allocator("fake")
    for _ in range(5):
        a.free(a.allocate(3000))
    row = next(c for c in a.stats()["size_classes"] if c["bytes"] == 3072)
    assert row["misses"] == 1 and row["hits"] == 4 and row["cached_blocks"] == 1 and row["allocated_blocks"] == 0


@pytest.mark.parametrize("thread_cache", [False, True])
def test_threads_stress_with_cross_thread_frees(thread_cache):
    a = torchpool.Allocator("fake", arenas=4, thread_cache=thread_cache)
    handoff = []
    lock = threading.Lock()
    errors = []

    def worker(seed):
        try:
            rng = random.Random(seed)
            mine = []
            for _ in range(3000):
                if len(mine) < 32 or rng.random() < 0.5:
                    mine.append(a.allocate(rng.choice([rng.randint(1, 8192), rng.randint(8192, 3 << 20)])))
                else:
                    a.free(mine.pop(rng.randrange(len(mine))))
            with lock:
                handoff.extend(mine)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert a.check() == ""
    for p in handoff:
        a.free(p)
    assert a.stats()["allocated_bytes.all.current"] == 0
    assert a.check() == ""


def test_torch_intra_op_threads_under_torchpool(python_subprocess):
    r = python_subprocess(textwrap.dedent("""
        import json, threading, torch, torchpool
        torch.set_num_threads(2)
        torchpool.install(arenas=2)
        def work(seed):
            g = torch.Generator().manual_seed(seed)
            for i in range(50):
                x = torch.randn(64 + i, 128, generator=g)
                (x @ x.T).sum().item()
        ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        a = torchpool.allocator()
        print(json.dumps({"check": a.check(), "allocs": a.stats()["allocation.all.allocated"]}))
        """))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["check"] == "" and out["allocs"] > 200


def test_empty_cache_releases_segments_and_report_reads():
    a = torchpool.Allocator("host")
    ps = [a.allocate(n) for n in (100, 5000, 3 << 20, 9 << 20)]
    for p in ps[1:]:
        a.free(p)
    released = a.empty_cache()
    s = torchpool.stats.derive(a.stats())
    assert released > 0 and s["reserved_bytes.all.current"] == 2 << 20  # only the small segment holding ps[0]
    report = torchpool.format_report(s)
    for needle in ("utilization", "external fragmentation", "busiest size classes", "reserved_bytes"):
        assert needle in report
    a.free(ps[0])
