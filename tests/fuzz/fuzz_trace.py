"""atheris fuzz targets for the trace importers and the replay, through the Python API.

    python tests/fuzz/fuzz_trace.py TARGET [libFuzzer flags] CORPUS_DIR...

TARGET is one of:
  any        the bytes as a file: torchpool.trace.loads (gzip or not; every format)
  native     the bytes after the torchpool magic (header line + records)
  rmm        the bytes after RMM's CSV header line
  snapshot   a snapshot-shaped dict built from the bytes (types and values chosen by the fuzzer),
             pickled with protocol 2-5, then loaded; odd inputs are also loaded as raw pickles
  replay     whatever loads is replayed on the fake-address allocators (torchpool modes, PyTorch
             emulation); the measures must be consistent
Accepted outcomes: a Trace, or torchpool.trace.TraceFormatError (TraceLimitError included).  Any other
exception, a crash, a hang or memory past -rss_limit_mb is a finding.  Limits are small
(Note [Trace limits]) so that each input costs little.  scripts/ci/fuzz_py.sh runs every target.
"""

from __future__ import annotations

import pickle
import sys

import atheris

with atheris.instrument_imports(include=["torchpool.tracing.trace", "torchpool.tracing.replay"]):
    import torchpool.tracing.replay as R
    import torchpool.tracing.trace as T

LIMITS = T.TraceLimits(max_bytes=4 << 20, max_events=20_000, max_header_bytes=1 << 20, max_pickle_bytes=1 << 20)
REPLAY_ALLOCATORS = ["torchpool", "torchpool-segments", "pytorch", "pytorch-expandable"]
RMM_HEADER = b"Thread,Time,Action,Pointer,Size,Stream\n"


def _load(data: bytes):
    try:
        return T.loads(data, limits=LIMITS, path="<fuzz>")
    except T.TraceFormatError:
        return None


def _check(trace) -> None:
    if trace is None:
        return
    rec = trace.records
    assert rec.dtype == T.RECORD
    blocks = rec["op"] <= 1
    assert (rec["op"] <= 4).all()
    assert (rec["size"][blocks] <= T.MAX_ALLOC_BYTES).all() and (rec["requested"][blocks] <= T.MAX_ALLOC_BYTES).all()
    assert isinstance(trace.name, str)


def target_any(data: bytes) -> None:
    _check(_load(data))


def target_native(data: bytes) -> None:
    _check(_load(T.MAGIC + data))


def target_rmm(data: bytes) -> None:
    _check(_load(RMM_HEADER + data))


_ACTIONS = ["alloc", "free_requested", "free_completed", "segment_alloc", "segment_free", "segment_map",
            "segment_unmap", "oom", "snapshot", "empty_cache", "user_defined", "teleport"]


def _value(fdp):
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind <= 4:
        return fdp.ConsumeIntInRange(0, 1 << 20) * (1 << fdp.ConsumeIntInRange(0, 50))
    if kind == 5:
        return fdp.ConsumeInt(9)  # up to +-2^71
    if kind == 6:
        return fdp.ConsumeFloat()
    if kind == 7:
        return fdp.ConsumeUnicode(8)
    if kind == 8:
        return None
    return [fdp.ConsumeIntInRange(0, 9)]


def target_snapshot(data: bytes) -> None:
    if data[:1] == b"\x80":  # a raw pickle (mutations of the corpus' pickles)
        _check(_load(data))
        return
    fdp = atheris.FuzzedDataProvider(data)
    events = []
    for _ in range(fdp.ConsumeIntInRange(0, 64)):
        e = {}
        if fdp.ConsumeBool():
            e["action"] = _ACTIONS[fdp.ConsumeIntInRange(0, len(_ACTIONS) - 1)] if fdp.ConsumeProbability() < 0.9 \
                else _value(fdp)
        for key in ("addr", "size", "stream", "time_us"):
            if fdp.ConsumeProbability() < 0.9:
                e[key] = _value(fdp)
        e["frames"] = [{"filename": "f.py", "line": 1, "name": "g"}] if fdp.ConsumeBool() else []
        events.append(e if fdp.ConsumeProbability() < 0.97 else _value(fdp))
    traces = [events] + [[] for _ in range(fdp.ConsumeIntInRange(0, 2))]
    snap = {"segments": [], "device_traces": traces if fdp.ConsumeProbability() < 0.95 else _value(fdp)}
    if fdp.ConsumeBool():
        snap["extra"] = {1, 2} if fdp.ConsumeBool() else b"\x00\x01"
    blob = pickle.dumps(snap, protocol=fdp.ConsumeIntInRange(2, 5))
    _check(_load(blob))


def target_replay(data: bytes) -> None:
    trace = _load(data)
    _check(trace)
    if trace is None or len(trace) == 0:
        return
    try:
        rows = R.replay(trace, REPLAY_ALLOCATORS, repeats=1, timeline_points=8, isolate=False)
    except T.TraceFormatError:  # Note [Replay input bounds]
        return
    live = {r["peak_live_bytes"] for r in rows}
    assert len(live) == 1, rows  # a property of the trace, the same for every allocator
    for r in rows:
        if r["_extra"]["ooms"] == 0 and r["peak_live_bytes"]:
            assert r["peak_reserved_bytes"] >= r["peak_live_bytes"], r
            assert 0 < r["utilization"] <= 1, r


TARGETS = {"any": target_any, "native": target_native, "rmm": target_rmm, "snapshot": target_snapshot,
           "replay": target_replay}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [CORPUS_DIR...]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
