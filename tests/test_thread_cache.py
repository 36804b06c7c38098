"""Thread caches (Note [Thread caches], csrc/core/thread_cache.h) under real PyTorch use: tensors made
and dropped on Python threads and DataLoader worker threads, statistics that stay exact, and nothing
left behind in a cache when a thread ends or empty_cache() runs."""

import json
import textwrap
import threading

import pytest
import torch

import torchpool


def test_thread_cache_is_an_option_with_a_schema_entry():
    opt = {o["name"]: o for o in torchpool.options()}["thread_cache"]
    assert opt["type"] == "bool"
    a = torchpool.Allocator("fake", thread_cache=True)
    p = a.allocate(100)
    assert a.block_size(p) == (128, 100)
    a.free(p)
    with pytest.raises(ValueError, match="does not own"):
        a.free(p)  # idle in the cache now: a second free is refused, as for any dead pointer
    assert not a.owns(p)
    assert a.check() == ""


def test_python_threads_making_tensors_leave_exact_stats_and_nothing_cached(python_subprocess):
    r = python_subprocess(textwrap.dedent("""
        import json, threading, torch, torchpool
        a = torchpool.install(thread_cache=1)
        def work(seed):
            keep = []
            for i in range(2000):
                t = torch.empty(1 + (seed * 7919 + i * 104729) % 4000, dtype=torch.uint8)
                t[0] = 1
                keep.append(t)
                if len(keep) > 20:
                    keep.pop(0)
        base = a.stats()
        ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        s = a.stats()
        out = {"check": a.check(), "live": s["allocation.all.current"] - base["allocation.all.current"],
               "bytes": s["allocated_bytes.all.current"] - base["allocated_bytes.all.current"],
               "allocs": s["allocation.all.allocated"] - base["allocation.all.allocated"],
               "hits": s["num_class_hits"]}
        a.empty_cache()
        out["reserved_after_empty"] = a.stats()["reserved_bytes.all.current"]
        out["live_after"] = a.stats()["allocation.all.current"]
        print(json.dumps(out))
        """))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["check"] == ""
    assert out["live"] == 0 and out["bytes"] == 0  # every tensor of the threads is gone
    assert out["allocs"] >= 4 * 2000
    assert out["hits"] > 4 * 1000  # most small tensors came from the caches
    # the exited threads' caches went back to the arenas: empty_cache returns all but the live blocks
    assert out["reserved_after_empty"] <= 8 << 20


def test_dataloader_worker_threads_with_thread_caches(python_subprocess):
    # pin_memory=False, workers as threads: torch's DataLoader uses processes; a thread pool is what
    # a custom loader or torch.compile's workers use.  The tensors cross threads before they die.
    r = python_subprocess(textwrap.dedent("""
        import json, queue, threading, torch, torchpool
        a = torchpool.install(thread_cache=1, arenas=2)
        q = queue.Queue(maxsize=8)
        def producer(k):
            for i in range(500):
                q.put(torch.full((1 + (i * 31 + k) % 3000,), float(k)))
            q.put(None)
        ps = [threading.Thread(target=producer, args=(k,)) for k in range(3)]
        [p.start() for p in ps]
        done = total = 0
        while done < 3:
            t = q.get()
            if t is None:
                done += 1
                continue
            total += int(t.numel())          # freed here, on the consumer: cross-thread frees
        [p.join() for p in ps]
        print(json.dumps({"check": a.check(), "total": total, "live": a.stats()["allocation.all.current"]}))
        """))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["check"] == ""
    assert out["total"] > 0
    assert out["live"] < 50  # only what the interpreter itself keeps


def test_tensors_freed_by_another_thread_with_thread_caches():
    a = torchpool.Allocator("host", thread_cache=True, arenas=2)
    ptrs = [a.allocate(64 + 13 * i) for i in range(300)]
    t = threading.Thread(target=lambda: [a.free(p) for p in ptrs])
    t.start()
    t.join()
    s = a.stats()
    assert s["allocation.all.current"] == 0
    assert s["requested_bytes.all.current"] == 0
    assert a.check() == ""
    a.empty_cache()
    assert a.stats()["reserved_bytes.all.current"] == 0
    assert torch.empty(10).numel() == 10
