"""torchpool as PyTorch's CUDA allocator on a real GPU.  Runs only where torch.cuda.is_available();
everywhere else it is skipped (these machines have no GPU: nothing here has been run yet, see
docs/reference/cuda.md).  Every check runs in a subprocess, because the allocator swap is once per process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA build of torch and a GPU (torch.cuda.is_available() is False); "
    "the CUDA path is tested against the fake driver in tests/test_cuda_fake.py",
)

TRAIN = """
import json, sys, torch
torch.manual_seed(0)
dev = "cuda"
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).to(dev)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
g = torch.Generator(device="cpu").manual_seed(1)
losses = []
for step in range(50):
    x = torch.randn(64, 256, generator=g).to(dev)
    y = torch.randint(0, 10, (64,), generator=g).to(dev)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(loss.item())
torch.cuda.synchronize()
"""


def run(code: str, env: dict | None = None) -> dict:
    full = dict(os.environ)
    full.pop("TORCHPOOL_CONF", None)
    full.update(env or {})
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("options", ["", "expandable_segments=True"])
def test_training_matches_the_default_allocator_and_stats_are_served(options):
    default = run(TRAIN + "print(json.dumps({'losses': losses}))")
    pooled = run(f"import torchpool\ntorchpool.install(device='cuda', {options})\n" + TRAIN + """
import torchpool
s = torchpool.memory_stats("cuda:0")
alloc = torchpool.cuda.allocator("cuda:0")
print(json.dumps({"losses": losses, "peak": s["allocated_bytes.all.peak"], "current": s["allocated_bytes.all.current"],
                  "reserved": s["reserved_bytes.all.current"], "check": alloc.check(), "upstream": alloc.upstream_name,
                  "segments": len(torchpool.memory_snapshot("cuda:0"))}))
""")
    assert pooled["losses"] == default["losses"]  # same kernels, same data: bitwise the same
    assert pooled["peak"] > 0 and pooled["reserved"] >= pooled["current"] > 0
    assert pooled["segments"] >= 1 and pooled["check"] == ""
    assert pooled["upstream"] == ("cuda_vmm" if options else "cuda")


def test_out_of_memory_surfaces_as_torch_out_of_memory_error():
    out = run("""
import json, torch, torchpool
torchpool.install(device="cuda", max_mb=64)
x = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
try:
    torch.empty(48 << 20, dtype=torch.uint8, device="cuda")
    err = None
except torch.OutOfMemoryError as e:
    err = str(e)
y = torch.empty(16 << 20, dtype=torch.uint8, device="cuda")   # still usable afterwards
print(json.dumps({"err": err, "ooms": torchpool.memory_stats("cuda:0")["num_ooms"]}))
""")
    assert out["err"] and "out of memory on cuda:0" in out["err"] and out["ooms"] == 1


def test_record_stream_workaround_defers_reuse():
    out = run("""
import json, torch, torchpool
torchpool.install(device="cuda")
side = torch.cuda.Stream()
x = torch.empty(8 << 20, dtype=torch.uint8, device="cuda")
ptr = x.data_ptr()
with torch.cuda.stream(side):
    torch.cuda._sleep(200_000_000)           # keep the side stream busy
    x.add_(1)
torchpool.cuda.record_stream(x, side)
del x
y = torch.empty(8 << 20, dtype=torch.uint8, device="cuda")
reused_early = y.data_ptr() == ptr
deferred = torchpool.memory_stats("cuda:0")["num_deferred_frees"]
side.synchronize()
torchpool.cuda.allocator("cuda:0").process_events()
print(json.dumps({"reused_early": reused_early, "deferred": deferred}))
""")
    assert not out["reused_early"] and out["deferred"] == 1


def test_install_after_cuda_is_initialised_says_what_to_do():
    out = run("""
import json, torch, torchpool
torch.empty(1, device="cuda")
try:
    torchpool.install(device="cuda")
    msg = None
except RuntimeError as e:
    msg = str(e)
print(json.dumps({"msg": msg}))
""")
    assert out["msg"] and "torchpool run" in out["msg"] and "TORCHPOOL_CONF" in out["msg"]


def test_mempool_route_serves_one_region():
    out = run("""
import json, torch, torchpool
pool = torchpool.cuda.mempool()
with torch.cuda.use_mem_pool(pool):
    x = torch.empty(4 << 20, dtype=torch.uint8, device="cuda")
y = torch.empty(4 << 20, dtype=torch.uint8, device="cuda")
a = torchpool.cuda.allocator("cuda:0")
print(json.dumps({"reserved": a.stats()["reserved_bytes.all.current"] if a else 0,
                  "torch_stats": torch.cuda.memory_stats()["allocated_bytes.all.current"] > 0}))
""")
    assert out["reserved"] >= 4 << 20 and out["torch_stats"]
