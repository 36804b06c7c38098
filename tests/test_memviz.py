"""torchpool.dump_snapshot: the pickle PyTorch's memory viewer (torch.cuda._memory_viz) reads."""

import pickle

import pytest
import torch

import torchpool

mv = pytest.importorskip("torch.cuda._memory_viz")

CODE = r"""
import pickle, sys, torch, torchpool
import torch.cuda._memory_viz as mv
torchpool.install()
out = sys.argv[1]
with torchpool.record_trace(out + ".tptrace.gz", stacks=True):
    keep = [torch.empty(n) for n in (10, 1000, 70_000, 300_000, 2_000_000)]
    drop = [torch.ones(n) for n in (5000, 600_000)]
    del drop
    small = torch.zeros(33) + 1
stats = torchpool.memory_stats()
torchpool.dump_snapshot(out, trace=out + ".tptrace.gz")
data = pickle.load(open(out, "rb"))
summary = mv.segsum(data)          # asserts that blocks account for every segment byte
text = mv.trace(data)              # the device trace, as text
flat = mv.memory(data, format_flamegraph=lambda s: s)  # flamegraph input (no download)
segs = mv.segments(data, format_flamegraph=lambda s: s)
html = mv.trace_plot(data) + mv.segment_plot(data)
print(repr(dict(
    reserved=sum(s["total_size"] for s in data["segments"]),
    allocated=sum(s["allocated_size"] for s in data["segments"]),
    requested=sum(s["requested_size"] for s in data["segments"]),
    stats=(stats["reserved_bytes.all.current"], stats["allocated_bytes.all.current"],
           stats["requested_bytes.all.current"]),
    summary=summary, text=text, flat=flat, segs=segs, html=len(html),
    framed=sum(1 for e in data["device_traces"][0] if e["frames"]),
    actions=sorted({e["action"] for e in data["device_traces"][0]}),
)))
"""


def test_dump_snapshot_is_read_by_torch_memory_viz(tmp_path, python_subprocess):
    out = tmp_path / "snap.pickle"
    r = python_subprocess(CODE.replace("sys.argv[1]", repr(str(out))))
    assert r.returncode == 0, r.stderr
    d = eval(r.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr
    assert (d["reserved"], d["allocated"], d["requested"]) == d["stats"]
    assert d["reserved"] > 0 and d["allocated"] > 0
    assert "total_reserved" in d["summary"] and "active_allocated" in d["flat"]
    assert "entries" in d["text"] and "TOTAL MEM" in d["text"]
    assert {"alloc", "free_completed", "free_requested"} <= set(d["actions"])
    assert d["framed"] > 0  # stacks=True recorded Python frames for the alloc events
    assert d["html"] > 1000


def test_block_states_map_to_pytorch_names():
    from torchpool.tracing.memviz import segments

    snap = [{"address": 0, "total_size": 300, "stream": 0, "segment_type": "small", "blocks": [
        {"address": 0, "size": 100, "requested_size": 90, "state": "allocated"},
        {"address": 100, "size": 100, "requested_size": 80, "state": "deferred"},
        {"address": 200, "size": 50, "requested_size": 0, "state": "cached"},
        {"address": 250, "size": 50, "requested_size": 0, "state": "free"}]}]
    (s,) = segments(snap)
    assert [b["state"] for b in s["blocks"]] == ["active_allocated", "active_pending_free", "inactive", "inactive"]
    assert (s["allocated_size"], s["active_size"], s["requested_size"]) == (100, 200, 170)
    mv.segsum({"segments": [s], "device_traces": [[]]})
