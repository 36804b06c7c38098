"""Expandable segments on host memory (host_vmm: a PROT_NONE reservation with private anonymous chunks mapped in
with MAP_FIXED), through torchpool.Allocator and through install(device="cpu", expandable_segments=True)."""

import json
import textwrap

import pytest

import torchpool

MiB = 1 << 20


def drift(alloc, sizes_mb):
    """Each step frees the previous large block and allocates a slightly larger one, while a small
    block allocated in between stays alive: the pattern that strands free segments."""
    keep, prev, peak = [], None, 0
    for mb in sizes_mb:
        if prev is not None:
            alloc.free(prev)
        prev = alloc.allocate(mb * MiB)
        keep.append(alloc.allocate(4096))
        peak = max(peak, alloc.stats()["reserved_bytes.all.current"])
    alloc.free(prev)
    for p in keep:
        alloc.free(p)
    return peak


def test_growing_sizes_reuse_the_free_tail_instead_of_new_segments():
    sizes = list(range(10, 42, 2))  # 10, 12, ..., 40 MiB
    nolimit = torchpool.Allocator("host", huge_pages=False, max_reserved_ratio=0)
    plain = torchpool.Allocator("host", huge_pages=False)
    vmm = torchpool.Allocator("host_vmm", reserve_bytes=1 << 30, max_reserved_ratio=0)
    peak_nolimit = drift(nolimit, sizes)
    peak_plain = drift(plain, sizes)
    peak_vmm = drift(vmm, sizes)
    assert vmm.check() == "" and plain.check() == "" and nolimit.check() == ""
    # With no reserve target, host keeps every earlier segment cached (none fits the next, larger
    # request): the sum.  With the default target (Note [Reserve target]) the free segments are
    # returned before each larger one is mapped: the largest request plus the small segment.
    assert peak_nolimit == sum(sizes) * MiB + 2 * MiB
    assert peak_plain == max(sizes) * MiB + 2 * MiB
    assert plain.stats()["num_target_releases"] == len(sizes) - 1
    # host_vmm grows the one segment's free tail even with no target, with no unmaps: the largest
    # request plus one 512 KiB chunk (the default chunk_bytes) for the small blocks.
    chunk = 512 << 10
    assert peak_vmm == max(sizes) * MiB + chunk
    s = vmm.stats()
    # one run of chunks per larger request, plus the chunk of the small (size-class) expandable segment
    assert s["num_chunk_maps"] == len(sizes) + 1 and s["num_chunk_unmaps"] == 0 and s["segment.all.peak"] == 2
    assert vmm.empty_cache() == max(sizes) * MiB + chunk
    assert vmm.stats()["reserved_bytes.all.current"] == 0


def test_snapshot_marks_the_expandable_segment_and_empty_cache_returns_the_tail():
    a = torchpool.Allocator("host_vmm", reserve_bytes=256 * MiB)
    p = a.allocate(3 * MiB)
    q = a.allocate(20 * MiB)
    assert q == p + 3 * MiB  # one reservation, contiguous
    a.free(q)
    released = a.empty_cache()
    assert released == 20 * MiB  # q's chunks; p's 3 MiB are six whole 512 KiB chunks and stay
    assert a.stats()["reserved_bytes.all.current"] == 3 * MiB
    a.free(p)
    assert a.check() == ""


def test_host_vmm_options_are_checked():
    a = torchpool.Allocator("host_vmm", huge_pages=True, reserve_bytes=64 * MiB)  # chunks get MADV_HUGEPAGE
    p = a.allocate(4 * MiB)
    a.free(p)
    assert a.check() == ""
    with pytest.raises(ValueError, match="unknown allocator option"):
        torchpool.Allocator("host_vmm", no_such=1)


def test_install_cpu_with_expandable_segments_serves_tensors(python_subprocess):
    r = python_subprocess(textwrap.dedent("""
        import json, torch, torchpool
        a = torchpool.install(device="cpu", expandable_segments=True, reserve_mb=1024)
        x = torch.ones(3 << 20)              # 12 MiB: a large block in the expandable segment
        y = torch.ones(4 << 20)
        z = (x.sum() + y.sum()).item()
        s = torchpool.memory_stats()
        del y
        released = torchpool.empty_cache()
        snap = torchpool.memory_snapshot()
        print(json.dumps({"upstream": a.upstream_name, "owns": a.owns(x.data_ptr()), "sum": z,
                          "chunk_maps": s["num_chunk_maps"], "released": released,
                          "large_segments": sum(1 for g in snap if g["segment_type"] == "large"), "check": a.check()}))
        """))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["upstream"] == "host_vmm" and out["owns"] and out["sum"] == float(7 << 20)
    assert out["chunk_maps"] >= 2 and out["released"] >= 16 * MiB
    assert out["large_segments"] == 1 and out["check"] == ""


def test_host_vmm_memory_is_copy_on_write_across_fork():
    # Note [Host VMM]: chunks are private anonymous memory, so a forked child (a DataLoader worker)
    # that writes memory it inherited does not change the parent's.
    import ctypes
    import os

    a = torchpool.Allocator("host_vmm", reserve_bytes=64 * MiB)
    p = a.allocate(3 * MiB)
    ctypes.memset(p, 1, 3 * MiB)
    pid = os.fork()
    if pid == 0:
        ctypes.memset(p, 2, 3 * MiB)
        os._exit(0 if ctypes.string_at(p + 3 * MiB - 1, 1) == b"\x02" else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert ctypes.string_at(p, 1) == b"\x01" and ctypes.string_at(p + 3 * MiB - 1, 1) == b"\x01"
    a.free(p)
    assert a.check() == ""
