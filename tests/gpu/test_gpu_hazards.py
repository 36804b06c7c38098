"""The checks a GPU must answer first for issue 14 (docs/reference/cuda.md, "What was verified where"): each runs in
a fresh interpreter (the allocator swap is once per process) and prints one JSON line.  Skipped where
torch has no GPU; run them all with tests/gpu/run_gpu_checks.sh (under five minutes).

Some checks assert what torchpool guarantees (the unmap race, capture refusal, OOM, fork, alignment);
others record what torch 2.13 does under any pluggable allocator (reduce-overhead, cudnn.benchmark) and
assert only that it fails loudly or works correctly, never silently wrong: their JSON goes into the
report that run_gpu_checks.sh writes, for docs/reference/cuda.md."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA build of torch and a GPU; the CUDA path is tested against the fake driver "
    "(tests/test_cuda_fake.py, tests/cpp/test_cuda_fake.cc)",
)

REPORT = os.environ.get("TORCHPOOL_GPU_REPORT")  # a JSON-lines file the results are appended to


def run(name: str, code: str, env: dict | None = None, expect_rc: int | None = 0) -> dict:
    full = dict(os.environ)
    full.pop("TORCHPOOL_CONF", None)
    full.update(env or {})
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full, timeout=240)
    out = {"rc": r.returncode, "stderr_tail": r.stderr[-2000:]}
    lines = [line for line in r.stdout.strip().splitlines() if line.startswith("{")]
    if lines:
        out.update(json.loads(lines[-1]))
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"check": name, **out}) + "\n")
    if expect_rc is not None:
        assert r.returncode == expect_rc, r.stderr
    return out


def test_empty_cache_waits_for_a_slow_kernel_on_a_side_stream():
    # Hazard 1: the chunks of a freed tensor must not be unmapped while a kernel still reads them.
    out = run("unmap_race", """
        import json, torch, torchpool
        torchpool.install(device="cuda", expandable_segments=True)
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            x = torch.ones(64 << 20, device="cuda")          # 256 MiB, in side's expandable segment
            torch.cuda._sleep(500_000_000)                    # a slow kernel first ...
            y = x * 2                                         # ... then one that reads x
            del x                                             # freed while y's kernel is queued
        released = torchpool.empty_cache("cuda:0")            # must synchronize side before cuMemUnmap
        junk = [torch.full((16 << 20,), 7.0, device="cuda") for _ in range(8)]   # remap the memory elsewhere
        torch.cuda.synchronize()
        print(json.dumps({"released": released, "correct": bool((y == 2).all().item())}))
        """)
    assert out["released"] > 0 and out["correct"]


def test_graph_capture_is_refused_and_a_capture_without_allocation_replays_like_eager():
    out = run("capture", """
        import json, torch, torchpool
        torchpool.install(device="cuda")
        inp = torch.randn(1024, 1024, device="cuda")
        out = torch.empty_like(inp)
        torch.mul(inp, 3.0, out=out); torch.cuda.synchronize()
        eager = out.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):
            with torch.cuda.graph(g, stream=s):
                torch.mul(inp, 3.0, out=out)                  # no allocation inside: allowed
        torchpool.empty_cache("cuda:0")
        out.zero_(); g.replay(); torch.cuda.synchronize()
        same = bool(torch.equal(out, eager))
        g2 = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g2):
                y = inp @ inp                                 # allocates: refused
            refused = None
        except Exception as e:
            refused = [type(e).__name__, str(e)[:400]]
        z = inp @ inp; torch.cuda.synchronize()               # eager work still fine afterwards
        print(json.dumps({"replay_equals_eager": same, "refused": refused}))
        """)
    assert out["replay_equals_eager"]
    assert out["refused"] and "CUDA graph capture" in out["refused"][1]


def test_reduce_overhead_fails_loudly_or_matches_eager():
    out = run("reduce_overhead", """
        import json, torch, torchpool
        torchpool.install(device="cuda")
        m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)).cuda()
        x = torch.randn(32, 256, device="cuda")
        eager = m(x)
        try:
            c = torch.compile(m, mode="reduce-overhead")
            outs = [c(x) for _ in range(3)]
            res = {"ok": True, "equal": bool(torch.allclose(outs[-1], eager, atol=1e-5))}
        except Exception as e:
            res = {"ok": False, "error": [type(e).__name__, str(e)[:400]]}
        print(json.dumps(res))
        """, expect_rc=None)
    assert out["rc"] == 0, out["stderr_tail"]
    assert (out.get("ok") and out.get("equal")) or (out.get("ok") is False and out["error"][1])


def test_cudnn_benchmark_fails_loudly_or_matches():
    out = run("cudnn_benchmark", """
        import json, torch, torchpool
        torchpool.install(device="cuda")
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(16, 32, 3).cuda()
        x = torch.randn(8, 16, 64, 64, device="cuda")
        ref = conv(x)
        torch.backends.cudnn.benchmark = True
        try:
            y = conv(x)
            res = {"ok": True, "close": bool(torch.allclose(y, ref, atol=1e-4))}
        except Exception as e:
            res = {"ok": False, "error": [type(e).__name__, str(e)[:400]]}
        print(json.dumps(res))
        """, expect_rc=None)
    assert out["rc"] == 0, out["stderr_tail"]
    assert (out.get("ok") and out.get("close")) or (out.get("ok") is False and out["error"][1])


@pytest.mark.parametrize("route", ["install", "mempool"])
def test_out_of_memory_through_both_routes(route):
    out = run(f"oom_{route}", f"""
        import json, torch, torchpool
        route = "{route}"
        if route == "install":
            torchpool.install(device="cuda")
            ctx = None
        else:
            pool = torchpool.cuda.mempool()
            ctx = torch.cuda.use_mem_pool(pool)
        huge = torch.cuda.get_device_properties(0).total_memory * 2
        def attempt():
            try:
                torch.empty(huge, dtype=torch.uint8, device="cuda")
                return None
            except Exception as e:
                return [type(e).__name__, str(e)[:400]]
        if ctx is None:
            err = attempt(); after = torch.ones(1 << 20, device="cuda").sum().item()
        else:
            with ctx:
                err = attempt(); after = torch.ones(1 << 20, device="cuda").sum().item()
        print(json.dumps({{"err": err, "after": after}}))
        """)
    assert out["err"] and out["err"][0] == "OutOfMemoryError" and out["after"] == float(1 << 20)


def test_fork_after_import_with_cuda_conf():
    out = run("fork", """
        import json, os, torchpool, torch                    # TORCHPOOL_CONF=cuda=1: installed at import
        pid = os.fork()
        if pid == 0:
            try:
                ok = torch.ones(4, device="cuda").sum().item() == 4.0
            except Exception:
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"child_ok": os.waitstatus_to_exitcode(status) == 0,
                          "parent_ok": torch.ones(4, device="cuda").sum().item() == 4.0}))
        """, env={"TORCHPOOL_CONF": "cuda=1"})
    assert out["child_ok"] and out["parent_ok"]


def test_blocks_are_512_byte_aligned_and_driver_errors_are_named():
    out = run("alignment_and_errors", """
        import json, torch, torchpool
        torchpool.install(device="cuda")
        ptrs = [torch.empty(n, dtype=torch.uint8, device="cuda").data_ptr() % 512 for n in (1, 100, 513, 70000)]
        x = torch.zeros(4, device="cuda")
        try:
            x[torch.tensor([1 << 30], device="cuda")] = 1.0    # a device-side fault (sticky)
            torch.cuda.synchronize()
        except Exception:
            pass
        try:
            torch.empty(1 << 20, device="cuda")
            err = None
        except Exception as e:
            err = [type(e).__name__, str(e)[:400]]
        print(json.dumps({"mods": ptrs, "after_fault": err}))
        """, expect_rc=None)
    assert out.get("mods") == [0, 0, 0, 0], out
    # after a sticky fault the next allocation names the driver error, it is not an "out of memory"
    if out.get("after_fault"):
        assert "out of memory" not in out["after_fault"][1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_expandable_tensor_read_by_a_peer_device():
    out = run("peer", """
        import json, torch, torchpool
        torchpool.install(device="cuda", expandable_segments=True)
        x = torch.arange(1 << 20, device="cuda:0", dtype=torch.float32)
        with torch.cuda.device(1):
            y = x.to("cuda:1") * 1
        print(json.dumps({"equal": bool(torch.equal(y.cpu(), x.cpu()))}))
        """)
    assert out["equal"]
