"""Several threads allocating and freeing at once through one allocator (Note [Flat owner map]), with
_C.churn: the raw loop of bench/bench_multithread.py (C++ threads, no GIL)."""

import threading

import pytest
import torch

import torchpool
from torchpool import _C


@pytest.mark.parametrize("upstream", ["fake", "host"])
@pytest.mark.parametrize("arenas", [1, 4])
@pytest.mark.parametrize("thread_cache", [False, True])
def test_churn_leaves_nothing_allocated_and_every_invariant_holds(upstream, arenas, thread_cache):
    a = _C.Allocator(upstream, arenas=arenas, thread_cache=thread_cache)
    sizes = [64, 1000, 4096, 16384, 100_000, 3 << 20, 512]
    seconds = _C.churn(4, 3000, sizes, live=16, touch=(upstream == "host"), allocator=a)
    assert seconds > 0
    s = a.stats()
    assert s["allocation.all.current"] == 0
    assert s["allocated_bytes.all.current"] == 0
    # every thread allocated `iterations` blocks and freed them all
    assert s["allocation.all.allocated"] == 4 * 3000 == s["allocation.all.freed"]
    assert a.check() == ""


def test_churn_on_malloc_runs_and_validates_its_arguments():
    assert _C.churn(2, 1000, [64, 1 << 20], live=4) > 0
    with pytest.raises(ValueError, match="threads"):
        _C.churn(0, 10, [64])
    with pytest.raises(ValueError, match="sizes"):
        _C.churn(1, 10, [])
    with pytest.raises(ValueError, match="size"):
        _C.churn(1, 10, [0])
    with pytest.raises(ValueError, match="live"):
        _C.churn(1, 10, [64], live=0)


def test_churn_out_of_memory_is_raised_not_a_crash():
    a = _C.Allocator("fake", capacity=8 << 20, max_reserved_ratio=0)
    with pytest.raises(torch.OutOfMemoryError):
        _C.churn(2, 100, [6 << 20], live=4, allocator=a)
    assert a.stats()["allocation.all.current"] == 0
    assert a.check() == ""


def test_tensors_freed_by_another_thread_return_to_their_allocator():
    with torchpool.installed() as a:
        before = a.stats()["allocation.all.current"]
        made = [torch.empty(n, dtype=torch.uint8) for n in (100, 5000, 1 << 20) * 20]
        for t in made:
            assert a.owns(t.data_ptr())
        t = threading.Thread(target=made.clear)  # the last references die on another thread
        t.start()
        t.join()
        assert a.stats()["allocation.all.current"] == before
        assert a.check() == ""
