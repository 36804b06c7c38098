"""The CUDA path against the fake driver (tests/fake_driver): libtorchpool_cuda.so, the library torch's
CUDAPluggableAllocator would call, reaches the fake through TORCHPOOL_CUDA_DRIVER + dlopen exactly as
it would reach libcuda.so.1.  Each test runs in a fresh interpreter (the library and the driver are
process-wide).  What this cannot show: that torch on a real GPU calls the library as expected (tests/gpu)."""

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

import torchpool
import torchpool.cuda as tc

FAKE_SRC = Path(__file__).parent / "fake_driver" / "fake_cuda.cc"
MiB = 1 << 20


@pytest.fixture(scope="session")
def fake_driver(tmp_path_factory) -> str:
    """Compiles the fake driver (a second or two); the C++ tests get it from CMake instead."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the fake CUDA driver")
    out = tmp_path_factory.mktemp("fake_cuda") / "libfake_cuda.so"
    subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", str(FAKE_SRC), "-o", str(out)], check=True)
    return str(out)


PRELUDE = """
import ctypes, json, os, torch, torchpool, torchpool.cuda as tc
fake = ctypes.CDLL(os.environ["TORCHPOOL_CUDA_DRIVER"])
for name in ("fake_cuda_used_bytes", "fake_cuda_reserved_bytes", "fake_cuda_num_mappings"):
    getattr(fake, name).restype = ctypes.c_size_t
fake.fake_cuda_set_capacity.argtypes = [ctypes.c_size_t]
fake.fake_cuda_complete.argtypes = [ctypes.c_uint64]
MiB = 1 << 20
"""


def run(python_subprocess, fake_driver, body: str) -> dict:
    r = python_subprocess(PRELUDE + textwrap.dedent(body), env={"TORCHPOOL_CUDA_DRIVER": fake_driver})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_streams_reuse_only_after_the_event_completes(python_subprocess, fake_driver):
    out = run(python_subprocess, fake_driver, """
        a = tc.CudaAllocator(0)
        s1, s2 = 0x100, 0x200
        p = a.allocate(5 * MiB, s1)
        a.record_stream(p, s2)
        a.free(p, s1)
        st = torchpool.memory_stats("cuda:0")          # torchpool's stats stand in for torch.cuda's
        states = [b["state"] for s in torchpool.memory_snapshot("cuda:0") for b in s["blocks"]]
        q = a.allocate(5 * MiB, s1)                     # p is not reusable yet
        other = a.allocate(5 * MiB, s2)                 # another stream never gets s1's blocks
        a.free(q, s1); a.free(other, s2)
        released_early = a.empty_cache()
        n = fake.fake_cuda_complete(s2)
        r = a.allocate(5 * MiB, s1)
        print(json.dumps({"allocated": st["allocated_bytes.all.current"], "active": st["active_bytes.all.current"],
                          "deferred": st["num_deferred_frees"], "states": states, "q_is_p": q == p,
                          "other_is_p": other == p, "completed": n, "r_is_p": r == p,
                          "released_early": released_early, "used_before_free": fake.fake_cuda_used_bytes(),
                          "check": a.check(), "upstream": a.upstream_name,
                          "via_module": torchpool.cuda.allocator("cuda:0") is not None}))
        """)
    assert out["allocated"] == 0 and out["active"] == 5 * MiB  # deferred: active, not allocated
    assert out["deferred"] == 1 and "deferred" in out["states"]
    assert not out["q_is_p"] and not out["other_is_p"]
    assert out["released_early"] == 12 * MiB  # q's and other's segments, not p's
    # empty_cache's cuMemFree synchronized the device (as cudaFree does), which completed s2's event
    assert out["completed"] == 0 and out["r_is_p"]
    assert out["used_before_free"] == 6 * MiB
    assert out["check"] == "" and out["upstream"] == "cuda" and out["via_module"]


def test_out_of_memory_then_retry_after_empty_cache(python_subprocess, fake_driver):
    out = run(python_subprocess, fake_driver, """
        fake.fake_cuda_set_capacity(64 * MiB)
        tc.configure(max_cached_mb=1024, max_reserved_ratio=0)  # no reserve target: the retry must free
        a = tc.CudaAllocator(0)
        a.free(a.allocate(40 * MiB))
        p = a.allocate(50 * MiB)          # 40 cached + 50 > 64: the retry frees the cache first
        s = a.stats()
        try:
            a.allocate(20 * MiB)
            msg = None
        except torch.OutOfMemoryError as e:
            msg = str(e)
        a.free(p)
        q = a.allocate(60 * MiB)
        a.free(q)
        released = torchpool.empty_cache("cuda:0")
        print(json.dumps({"retries": s["num_alloc_retries"], "msg": msg, "ooms": a.stats()["num_ooms"],
                          "released": released, "used": fake.fake_cuda_used_bytes()}))
        """)
    assert out["retries"] == 1
    assert out["msg"] and "out of memory on cuda:0" in out["msg"] and "tried to allocate 20.00 MiB" in out["msg"]
    assert out["ooms"] == 1
    assert out["released"] == 60 * MiB and out["used"] == 0


def test_oom_handler_is_called_with_the_message(python_subprocess, fake_driver):
    # In torch, the handler is torchpool._C's, which throws c10::OutOfMemoryError; here a recorder.
    out = run(python_subprocess, fake_driver, """
        seen = []
        HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(lambda m: seen.append(m.decode()))
        lib = tc._library()
        lib.torchpool_cuda_set_oom_handler(ctypes.cast(HANDLER, ctypes.c_void_p))
        fake.fake_cuda_set_capacity(8 * MiB)
        p = lib.torchpool_cuda_alloc(16 * MiB, 0, None)
        print(json.dumps({"null": not p, "seen": seen, "handler": torchpool._C._cuda_oom_handler() != 0}))
        """)
    assert out["null"] and len(out["seen"]) == 1 and "out of memory on cuda:0" in out["seen"][0]
    assert out["handler"]


def test_expandable_segments_grow_and_shrink(python_subprocess, fake_driver):
    out = run(python_subprocess, fake_driver, """
        tc.configure(expandable_segments=True, reserve_mb=512)
        a = tc.CudaAllocator(0)
        p = a.allocate(7 * MiB)
        q = a.allocate(9 * MiB)
        ctypes.memset(q, 1, 9 * MiB)             # mapped and accessible (cuMemSetAccess ran)
        grown = {"contiguous": q == p + 7 * MiB, "mappings": fake.fake_cuda_num_mappings(),
                 "reserved_va": fake.fake_cuda_reserved_bytes()}
        a.free(q)
        seg = torchpool.memory_snapshot("cuda:0")
        released = a.empty_cache()
        shrunk = {"mappings": fake.fake_cuda_num_mappings(), "used": fake.fake_cuda_used_bytes()}
        a.free(p)
        a.empty_cache()
        print(json.dumps({"grown": grown, "released": released, "shrunk": shrunk, "upstream": a.upstream_name,
                          "expandable": [s["expandable"] for s in seg], "maps": a.stats()["num_chunk_maps"],
                          "end": [fake.fake_cuda_num_mappings(), fake.fake_cuda_reserved_bytes(), fake.fake_cuda_used_bytes()]}))
        """)
    assert out["upstream"] == "cuda_vmm"
    assert out["grown"] == {"contiguous": True, "mappings": 8, "reserved_va": 512 * MiB}
    assert out["expandable"] == [True] and out["maps"] == 2
    assert out["released"] == 8 * MiB and out["shrunk"] == {"mappings": 4, "used": 8 * MiB}
    assert out["end"] == [0, 0, 0]


def test_configuration_errors_are_clear(python_subprocess, fake_driver):
    out = run(python_subprocess, fake_driver, """
        errs = []
        try:
            tc.configure(no_such_option=1)
        except torchpool.ConfigError as e:
            errs.append(str(e))
        tc.configure(huge_pages=True, populate=False, max_cached_mb=64)   # host-only options are ignored
        a = tc.CudaAllocator(0)
        a.free(a.allocate(1024))
        try:
            tc.configure(max_cached_mb=1)
        except torchpool.ConfigError as e:
            errs.append(str(e))
        print(json.dumps(errs))
        """)
    assert "unknown option 'no_such_option'" in out[0]
    assert "before the first CUDA allocation" in out[1]


def test_missing_driver_is_an_error_not_an_out_of_memory(python_subprocess):
    r = python_subprocess(textwrap.dedent("""
        import torchpool.cuda as tc
        try:
            tc.CudaAllocator(0).allocate(1024)
        except tc.CudaUnavailableError as e:
            print("unavailable:", e)
        """), env={"TORCHPOOL_CUDA_DRIVER": "/nonexistent/libcuda.so.1"})
    assert r.returncode == 0, r.stderr
    assert "unavailable: torchpool: cannot load the CUDA driver /nonexistent/libcuda.so.1" in r.stdout


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the error of a CPU-only torch")
def test_install_cuda_on_cpu_torch_says_what_to_do(python_subprocess):
    with pytest.raises(tc.CudaUnavailableError, match="built without CUDA"):
        torchpool.install(device="cuda")
    assert torchpool.allocator("cuda") is None
    r = python_subprocess("import torchpool", env={"TORCHPOOL_CONF": "cuda=1"})
    assert r.returncode != 0 and "built without CUDA" in r.stderr


def test_library_links_no_torch_and_no_cuda():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not installed")
    path = tc.library_path()
    needed = [line for line in subprocess.run([readelf, "-d", path], capture_output=True, text=True, check=True).stdout.splitlines()
              if "(NEEDED)" in line]
    assert needed, "readelf found no NEEDED entries"
    for bad in ("libtorch", "libc10", "libcuda", "libcudart", "libpython"):
        assert not any(bad in line for line in needed), (bad, needed)


def test_extension_upstreams_pinned_and_vmm_reach_the_fake(python_subprocess, fake_driver):
    # The same upstreams compiled into torchpool._C ("cuda_pinned" for the loader's staging pool).
    out = run(python_subprocess, fake_driver, """
        fake.fake_cuda_host_bytes.restype = ctypes.c_size_t
        pinned = torchpool.Allocator("cuda_pinned")
        p = pinned.allocate(3 * MiB)
        ctypes.memset(p, 2, 3 * MiB)
        host_after_alloc = fake.fake_cuda_host_bytes()
        pinned.free(p)
        pinned.empty_cache()
        vmm = torchpool.Allocator("cuda_vmm", cuda_device=1, reserve_bytes=64 * MiB)
        q = vmm.allocate(5 * MiB)
        maps = fake.fake_cuda_num_mappings()
        vmm.free(q)
        vmm.empty_cache()
        print(json.dumps({"host": host_after_alloc, "host_end": fake.fake_cuda_host_bytes(), "maps": maps,
                          "maps_end": fake.fake_cuda_num_mappings(), "names": [pinned.upstream_name, vmm.upstream_name],
                          "driver": torchpool._C._cuda_driver() == os.environ["TORCHPOOL_CUDA_DRIVER"]}))
        """)
    assert out == {"host": 4 * MiB, "host_end": 0, "maps": 3, "maps_end": 0,
                   "names": ["cuda_pinned", "cuda_vmm"], "driver": True}


# ---- hazards a GPU would hit (Note [Fake driver hazards] in tests/fake_driver/fake_cuda.cc) ----------------
# Each of these failed on the library before issue 14 (see docs/reference/cuda.md, "What was verified where").

HAZARD_PRELUDE = """
fake.fake_cuda_launch.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t]
fake.fake_cuda_hazard_text.restype = ctypes.c_char_p
fake.fake_cuda_capture_status.argtypes = [ctypes.c_uint64]
fake.fake_cuda_device_of.argtypes = [ctypes.c_uint64]
fake.fake_cuda_current_context.restype = ctypes.c_void_p
fake.fake_cuda_calls.argtypes = [ctypes.c_char_p]
fake.fake_cuda_calls.restype = ctypes.c_long
fake.fake_cuda_inject.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_long]
fake.cuStreamBeginCapture_v2.argtypes = [ctypes.c_void_p, ctypes.c_int]
lib = tc._library()
def failure(fn):
    try:
        fn()
        return None
    except Exception as e:  # the type and the message are what the tests check
        return [type(e).__name__, str(e)]
"""


def run_h(python_subprocess, fake_driver, body: str) -> dict:
    return run(python_subprocess, fake_driver, HAZARD_PRELUDE + textwrap.dedent(body))


def test_empty_cache_unmaps_only_after_the_stream_has_passed(python_subprocess, fake_driver):
    out = run_h(python_subprocess, fake_driver, """
        tc.configure(expandable_segments=True, reserve_mb=256)
        a = tc.CudaAllocator(0)
        s = 0x300
        keep = a.allocate(2 * MiB, s)
        p = a.allocate(8 * MiB, s)
        fake.fake_cuda_launch(s, p, 8 * MiB)      # a kernel still reads the tensor when it is freed
        a.free(p, s)
        released = torchpool.empty_cache("cuda:0")
        print(json.dumps({"released": released, "hazards": fake.fake_cuda_hazard_text().decode(),
                          "pending": fake.fake_cuda_pending_work()}))
        """)
    assert out["released"] == 8 * MiB
    assert out["hazards"] == "" and out["pending"] == 0


def test_graph_capture_is_refused_with_a_clear_error_and_the_capture_survives(python_subprocess, fake_driver):
    out = run_h(python_subprocess, fake_driver, """
        a = tc.CudaAllocator(0)
        s = 0x400
        a.free(a.allocate(MiB, s), s)             # a warm cache: the block could be handed out silently
        res = {}
        for mode in (0, 1, 2):                     # global, thread-local, relaxed
            assert fake.cuStreamBeginCapture_v2(s, mode) == 0
            res[mode] = {"warm": failure(lambda: a.allocate(MiB, s)), "cold": failure(lambda: a.allocate(64 * MiB, s)),
                         "status": fake.fake_cuda_capture_status(s)}
            g = ctypes.c_void_p()
            res[mode]["end"] = fake.cuStreamEndCapture(ctypes.c_void_p(s), ctypes.byref(g))
        after = a.allocate(MiB, s)                 # after the capture, allocation works again
        print(json.dumps({"res": res, "after": after != 0, "check": a.check()}))
        """)
    for mode, r in out["res"].items():
        for which in ("warm", "cold"):
            name, msg = r[which]
            assert name == "CudaGraphCaptureError", (mode, which, r)
            assert "CUDA graph capture" in msg and "without torchpool.install(device='cuda')" in msg
        assert r["status"] == 1 and r["end"] == 0  # the capture was not invalidated
    assert out["after"] and out["check"] == ""


def test_driver_errors_are_named_and_only_out_of_memory_is_an_oom(python_subprocess, fake_driver):
    out = run_h(python_subprocess, fake_driver, """
        tc.configure(expandable_segments=True, reserve_mb=256)
        a = tc.CudaAllocator(0)
        a.free(a.allocate(MiB))
        fake.fake_cuda_inject(b"cuMemCreate", 400, -1)      # CUDA_ERROR_INVALID_HANDLE, every call
        invalid = failure(lambda: a.allocate(6 * MiB))
        fake.fake_cuda_inject(b"cuMemCreate", 0, 0)
        fake.fake_cuda_set_capacity(16 * MiB)
        oom = failure(lambda: a.allocate(64 * MiB))
        fake.fake_cuda_set_capacity(1 << 33)
        fake.fake_cuda_set_sticky(700)                      # CUDA_ERROR_ILLEGAL_ADDRESS, as after a kernel fault
        sticky = failure(lambda: a.allocate(MiB))
        fake.fake_cuda_set_sticky(0)
        print(json.dumps({"invalid": invalid, "oom": oom, "sticky": sticky, "ok": a.allocate(MiB) != 0}))
        """)
    name, msg = out["invalid"]
    assert name == "RuntimeError" and "cuMemCreate: CUDA_ERROR_INVALID_HANDLE (400)" in msg and "out of memory" not in msg
    name, msg = out["oom"]
    assert name == "OutOfMemoryError" and "out of memory on cuda:0" in msg
    name, msg = out["sticky"]
    assert name == "RuntimeError" and "CUDA_ERROR_ILLEGAL_ADDRESS (700)" in msg and "restart" in msg
    assert out["ok"]


def test_a_throwing_handler_never_crosses_ctypes(python_subprocess, fake_driver):
    # install() and mempool() hand the library a handler that throws C++ exceptions into torch's
    # allocation call; Python's own calls must still raise Python exceptions, not abort the process.
    out = run_h(python_subprocess, fake_driver, """
        lib.torchpool_cuda_set_oom_handler(ctypes.c_void_p(torchpool._C._cuda_oom_handler()))
        if hasattr(lib, "torchpool_cuda_set_error_handler"):
            lib.torchpool_cuda_set_error_handler(ctypes.c_void_p(torchpool._C._cuda_error_handler()))
        fake.fake_cuda_set_capacity(8 * MiB)
        print(json.dumps({"oom": failure(lambda: tc.CudaAllocator(0).allocate(16 * MiB))}))
        """)
    assert out["oom"][0] == "OutOfMemoryError"


def test_blocks_are_512_byte_aligned_as_pytorchs(python_subprocess, fake_driver):
    out = run_h(python_subprocess, fake_driver, """
        a = tc.CudaAllocator(0)
        ptrs = [a.allocate(n) for n in (1, 100, 513, 4000, 70000, 3 * MiB + 7)]
        print(json.dumps({"mods": [p % 512 for p in ptrs], "gap": ptrs[1] - ptrs[0]}))
        """)
    assert out["mods"] == [0] * 6 and out["gap"] >= 512


def test_no_cuinit_before_the_first_allocation_so_fork_works(python_subprocess, fake_driver):
    out = run_h(python_subprocess, fake_driver, """
        loaded = lib.torchpool_cuda_driver().decode()       # what install() checks at import with cuda=1
        tc.configure(max_reserved_ratio=0)
        inits_at_load = fake.fake_cuda_calls(b"cuInit")
        pid = os.fork()
        if pid == 0:                                        # the child uses CUDA first
            try:
                ok = tc.CudaAllocator(0).allocate(MiB) != 0
            except Exception:
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"loaded": loaded == os.environ["TORCHPOOL_CUDA_DRIVER"], "inits_at_load": inits_at_load,
                          "child_ok": os.waitstatus_to_exitcode(status) == 0}))
        """)
    assert out == {"loaded": True, "inits_at_load": 0, "child_ok": True}


def test_the_callers_context_is_restored_and_memory_comes_from_the_device_asked_for(python_subprocess, fake_driver):
    out = run_h(python_subprocess, fake_driver, """
        fake.fake_cuda_set_context(1)                       # the thread works on device 1
        before = fake.fake_cuda_current_context()
        a0 = tc.CudaAllocator(0)
        p = a0.allocate(4 * MiB)
        print(json.dumps({"device": fake.fake_cuda_device_of(p), "restored": fake.fake_cuda_current_context() == before}))
        """)
    assert out == {"device": 0, "restored": True}


def test_cuda_library_checks_options_by_the_same_schema(python_subprocess, fake_driver):
    # Note [One option schema]: the text boundary of libtorchpool_cuda.so parses and checks every option
    # with the same rule (and states it with the same text) as install() and Allocator(**kwargs).
    from test_options import NUMERIC, _bad_and_good

    cases = [(o["name"], *_bad_and_good(o), o["range"]) for o in NUMERIC if "cuda" in o["devices"]]
    out = run(python_subprocess, fake_driver, f"""
        lib = tc._library()
        res = {{}}
        for name, bad, good, rule in {cases!r}:
            rc_bad = lib.torchpool_cuda_configure(f"{{name}}={{bad}}".encode())
            err = tc._last_error()
            res[name] = [rc_bad, err, rule, lib.torchpool_cuda_configure(f"{{name}}={{good}}".encode())]
        res["chunk_bytes"] = [lib.torchpool_cuda_configure(b"chunk_bytes=4096"), tc._last_error()]
        res["publish"] = [lib.torchpool_cuda_configure(b"publish=1"), tc._last_error()]
        res["bool"] = [lib.torchpool_cuda_configure(b"expandable_segments=yes"), tc._last_error()]
        print(json.dumps(res))
        """)
    assert len(out) > 10
    for name in [c[0] for c in cases]:
        rc_bad, err, rule, rc_good = out[name]
        assert rc_bad == -1 and rc_good == 0, (name, err)
        assert f"option {name}=" in err and err.endswith("valid: " + rule), err
    assert out["chunk_bytes"] == [-1, "torchpool: option 'chunk_bytes' does not apply to CUDA"]
    assert out["publish"] == [-1, "torchpool: unknown CUDA allocator option 'publish'"]
    assert out["bool"][0] == -1 and "a boolean" in out["bool"][1]


def test_cuda_stats_and_snapshot_are_the_cpu_serializer(python_subprocess, fake_driver):
    # Note [One serializer]: the same keys (and, for the same operations on the same policy, the same
    # values) from the CUDA library's JSON as from Allocator.stats() / snapshot(); mapped_size included.
    out = run(python_subprocess, fake_driver, """
        tc.configure(alignment=64)              # the CPU default's alignment: the same policy
        ops = [5 * MiB, 1000, 70000, 3000]
        def drive(a):
            ps = [a.allocate(n) for n in ops]
            a.free(ps[1])
            return ps
        cuda = tc.CudaAllocator(0)
        cpu = torchpool.Allocator("fake", arenas=1, max_reserved_ratio=1.05, thread_cache=False)  # CUDA has none
        drive(cuda); drive(cpu)
        strip = lambda segs: sorted((json.dumps({k: v for k, v in s.items() if k not in ("address", "stream")} | {
            "blocks": [{k: v for k, v in b.items() if k != "address"} for b in s["blocks"]]}) for s in segs))
        print(json.dumps({"cuda": cuda.stats(), "cpu": cpu.stats(), "cuda_snap": strip(cuda.snapshot()),
                          "cpu_snap": strip(cpu.snapshot()), "via": torchpool.memory_snapshot("cuda:0")[0]["blocks"][0]}))
        """)
    assert set(out["cuda"]) == set(out["cpu"]) and out["cuda"]["size_classes"]
    assert out["cuda"] == out["cpu"]
    assert out["cuda_snap"] == out["cpu_snap"] and len(out["cuda_snap"]) >= 2
    assert {"mapped_size", "size", "requested_size", "size_class", "state", "address"} <= set(out["via"])
