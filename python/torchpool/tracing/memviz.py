"""Export torchpool's state in the pickle format of PyTorch's memory viewer.

    torchpool.dump_snapshot("snap.pickle")                      # segments and blocks now
    torchpool.dump_snapshot("snap.pickle", trace="run.tptrace")  # + the trace's events (timeline)

Drag the file onto https://pytorch.org/memory_viz, or use torch.cuda._memory_viz offline
(``python -m torch.cuda._memory_viz stats snap.pickle``, ``segsum``, ``trace_plot``, ...).

The format is what torch.cuda.memory._snapshot() returns: {"segments": [...], "device_traces": [...]}.
torchpool's block states map to PyTorch's: allocated -> active_allocated, deferred (freed by its owner,
still in use by another stream) -> active_pending_free, free and cached (a size-class block kept for
reuse) -> inactive.  Frames are empty unless stacks were recorded: a trace recorded with stacks=True
gives its alloc events their Python stacks, and each live block the stack of the alloc that made it;
while a LeakDetector runs, the blocks it sampled carry their stacks too (Note [Sampled allocation
stacks]).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

_STATES = {"allocated": "active_allocated", "deferred": "active_pending_free", "free": "inactive",
           "cached": "inactive"}
_ACTIONS = {0: ["alloc"], 1: ["free_requested", "free_completed"], 2: ["segment_alloc"], 3: ["segment_free"],
            4: ["oom"]}


def _device_index(device) -> int:
    return torch.device(device).index or 0


def _frames(stack: list[str], sep: str = " ") -> list[dict]:
    """Stack strings, innermost last, -> PyTorch's frame dicts, innermost first.  trace.py writes
    "file:line function" (sep " "); the LeakDetector's sampler "path:line in function" (sep " in ")."""
    out = []
    for s in reversed(stack):
        loc, _, name = s.partition(sep) if sep == " " else s.rpartition(sep)
        filename, _, line = loc.rpartition(":")
        out.append({"filename": filename, "line": int(line) if line.isdigit() else 0, "name": name})
    return out


def block_frames(trace=None) -> dict[int, list[dict]]:
    """address -> frames of the allocation that made the live block there: from a trace recorded with
    stacks=True (the latest alloc at each address not freed since), else from a running LeakDetector's
    samples."""
    out: dict[int, list[dict]] = {}
    from .._build import _C

    if _C.monitor.sampler_running():
        cache: dict[int, list[dict]] = {}
        for sid, _b, _n, _c, _k in _C.monitor.sampler_live():
            if sid not in cache:
                cache[sid] = _frames(list(_C.monitor.sampler_stack(sid)), sep=" in ")
            for addr, _size, _birth in _C.monitor.sampler_addresses(sid):
                out[addr] = cache[sid]
    if trace is not None:
        stacks = [_frames(st) for st in trace.header.get("stacks") or []]
        by_event = {int(i): int(k) for i, k in trace.header.get("event_stacks") or []}
        rec = trace.records
        for i in range(len(rec)):
            op, addr = int(rec["op"][i]), int(rec["addr"][i])
            if op == 0 and i in by_event:
                out[addr] = stacks[by_event[i]]
            elif op in (0, 1):
                out.pop(addr, None)
    return out


def segments(snapshot: list[dict], device=0, frames: dict[int, list[dict]] | None = None) -> list[dict]:
    """torchpool.memory_snapshot() segments -> memory_viz segment dicts; `frames` (address -> frame
    dicts, block_frames()) gives live blocks their allocation stacks."""
    dev = device if isinstance(device, int) else _device_index(device)
    frames = frames or {}
    out = []
    for seg in snapshot:
        blocks = [{"address": b["address"], "size": b["size"],
                   "requested_size": b["requested_size"] if b["state"] in ("allocated", "deferred") else 0,
                   "state": _STATES[b["state"]],
                   "frames": frames.get(b["address"], []) if b["state"] in ("allocated", "deferred") else []}
                  for b in seg["blocks"]]
        out.append({
            "device": dev,
            "address": seg["address"],
            "total_size": seg["total_size"],
            "allocated_size": sum(b["size"] for b in blocks if b["state"] == "active_allocated"),
            "active_size": sum(b["size"] for b in blocks if b["state"] != "inactive"),
            "requested_size": sum(b["requested_size"] for b in blocks),
            "stream": seg["stream"],
            "segment_type": seg.get("segment_type", "large"),
            "segment_pool_id": (0, 0),
            "is_expandable": bool(seg.get("expandable", False)),
            "frames": [],
            "blocks": blocks,
        })
    return out


def device_trace(trace) -> list[dict]:
    """A torchpool Trace -> one device's list of memory_viz trace events."""
    stacks = trace.header.get("stacks") or []
    by_event = {int(i): int(s) for i, s in trace.header.get("event_stacks") or []}
    frames_of = [_frames(s) for s in stacks]
    rec = trace.records
    events = []
    for i in range(len(rec)):
        op = int(rec["op"][i])
        size = int(rec["requested"][i] or rec["size"][i]) if op in (0, 1) else int(rec["size"][i])
        for action in _ACTIONS[op]:
            e = {"action": action, "addr": int(rec["addr"][i]), "size": size, "stream": int(rec["stream"][i]),
                 "time_us": int(rec["time_ns"][i]) // 1000,
                 "frames": frames_of[by_event[i]] if op == 0 and i in by_event else []}
            if op == 4:
                e["device_free"] = 0
            events.append(e)
    return events


def to_memory_viz(snapshot: list[dict], device="cpu", trace=None) -> dict:
    """The dict memory_viz reads: segments from `snapshot`, device_traces from `trace` (a Trace or a
    path) at the device's index."""
    dev = _device_index(device)
    traces: list[list[dict]] = [[] for _ in range(dev + 1)]
    if trace is not None:
        if isinstance(trace, (str, os.PathLike)):
            from .trace import load

            trace = load(trace)
        traces[dev] = device_trace(trace)
    return {"segments": segments(snapshot, dev, block_frames(trace)), "device_traces": traces}


def dump_snapshot(path: str | os.PathLike, device="cpu", trace=None) -> Path:
    """Write torchpool.memory_snapshot(device) (and `trace`'s events, if given) as a memory_viz pickle."""
    from .._install import memory_snapshot

    path = Path(path)
    data = to_memory_viz(memory_snapshot(device), device, trace)
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path
