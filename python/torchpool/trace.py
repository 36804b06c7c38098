"""Allocation traces: record torchpool's events to a file, load them, import other allocators' logs.

    with torchpool.record_trace("run.tptrace"):       # or rec = record_trace(p); rec.start(); ...; rec.stop()
        train_step()
    trace = torchpool.trace.load("run.tptrace")        # also RMM CSV logs and PyTorch snapshot pickles

The trace file format (version 1)
---------------------------------
A gzip stream (so ``zcat`` and any gzip library read it) holding, in order:

1. the 9-byte magic ``b"TPTRACE1\\n"``;
2. one line of UTF-8 JSON (the header) ending in ``\\n``, with at least
   ``{"format": "torchpool-trace", "version": 1, "records": N, "record_bytes": 48}`` and optionally
   ``device``, ``source`` (what produced it), ``dropped`` (events the bounded ring overwrote),
   ``meta`` (free-form: workload, torch version, ...), ``stacks`` (a list of Python stacks, each a
   list of ``"file:line function"`` strings, innermost last) and ``event_stacks`` (pairs
   ``[record index, stack index]``);
3. N little-endian 48-byte records, the C++ ``torchpool::TraceEvent`` (csrc/core/trace.h):

   ========  ======  =====================================================================
   offset    type    field
   ========  ======  =====================================================================
   0         u64     time_ns: nanoseconds since recording started (steady clock)
   8         u64     addr: block address (segment base for map/unmap; 0 for oom)
   16        u64     size: block size after rounding (segment size for map/unmap, request for oom)
   24        u64     requested: bytes asked for (alloc/free), 0 otherwise
   32        u64     stream
   40        i32     device (-1: host)
   44        u8      op: 0 alloc, 1 free, 2 segment map, 3 segment unmap, 4 oom
   45        u8[3]   padding (0)
   ========  ======  =====================================================================

Records are in the order the allocator performed them.  Importers produce the same records, so
everything downstream (replay, plots) reads one format.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import pickle
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"TPTRACE1\n"
VERSION = 1
OPS = {"alloc": 0, "free": 1, "segment_map": 2, "segment_unmap": 3, "oom": 4}
OP_NAMES = {v: k for k, v in OPS.items()}
RECORD = np.dtype([
    ("time_ns", "<u8"), ("addr", "<u8"), ("size", "<u8"), ("requested", "<u8"), ("stream", "<u8"),
    ("device", "<i4"), ("op", "u1"), ("pad", "u1", (3,)),
])
assert RECORD.itemsize == 48


class TraceFormatError(ValueError):
    """A file that is not a trace this module can read, or a broken one; the message names the file
    (and the line or record where it went wrong)."""


@dataclass
class Trace:
    records: np.ndarray  # dtype RECORD
    header: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.header.get("name") or self.header.get("meta", {}).get("workload") or "trace"

    def __len__(self) -> int:
        return len(self.records)

    def count(self, op: str) -> int:
        return int(np.count_nonzero(self.records["op"] == OPS[op]))

    def to_bytes(self) -> bytes:
        return np.ascontiguousarray(self.records, dtype=RECORD).tobytes()

    def live_bytes(self) -> np.ndarray:
        """Requested bytes held after each record (allocs and frees matched by address)."""
        live, out, cur = {}, np.zeros(len(self.records), dtype=np.int64), 0
        for i, (op, addr, size, req) in enumerate(zip(self.records["op"], self.records["addr"],
                                                      self.records["size"], self.records["requested"])):
            if op == 0:
                n = int(req or size)
                cur += n - live.get(int(addr), 0)
                live[int(addr)] = n
            elif op == 1:
                cur -= live.pop(int(addr), 0)
            out[i] = cur
        return out


def make_records(n: int) -> np.ndarray:
    return np.zeros(n, dtype=RECORD)


# ---- the file format ----------------------------------------------------------------------------

def save(trace: Trace, path: str | os.PathLike) -> Path:
    path = Path(path)
    header = dict(trace.header)
    header.update({"format": "torchpool-trace", "version": VERSION, "records": len(trace.records),
                   "record_bytes": RECORD.itemsize})
    with gzip.open(path, "wb", compresslevel=6) as f:
        f.write(MAGIC)
        f.write(json.dumps(header, separators=(",", ":")).encode() + b"\n")
        f.write(trace.to_bytes())
    return path


def _load_native(path: Path, data: bytes) -> Trace:
    if not data.startswith(MAGIC):
        raise TraceFormatError(f"{path}: not a torchpool trace (bad magic {data[:9]!r})")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise TraceFormatError(f"{path}: truncated torchpool trace (no header line)")
    try:
        header = json.loads(data[len(MAGIC):end])
    except json.JSONDecodeError as e:
        raise TraceFormatError(f"{path}: torchpool trace header (line 2) is not JSON: {e}") from None
    if header.get("format") != "torchpool-trace":
        raise TraceFormatError(f"{path}: header names format {header.get('format')!r}, not 'torchpool-trace'")
    if header.get("version") != VERSION:
        raise TraceFormatError(f"{path}: torchpool trace version {header.get('version')!r}; this torchpool reads "
                               f"version {VERSION}")
    if header.get("record_bytes") != RECORD.itemsize:
        raise TraceFormatError(f"{path}: records of {header.get('record_bytes')} bytes, expected {RECORD.itemsize}")
    body = data[end + 1:]
    n = header.get("records")
    if len(body) != n * RECORD.itemsize:
        raise TraceFormatError(f"{path}: header promises {n} records ({n * RECORD.itemsize} bytes) but the file holds "
                               f"{len(body)} bytes: truncated or corrupt")
    records = np.frombuffer(body, dtype=RECORD).copy()
    bad = np.nonzero(records["op"] > 4)[0]
    if len(bad):
        raise TraceFormatError(f"{path}: record {int(bad[0])} has unknown op {int(records['op'][bad[0]])}")
    return Trace(records, header)


def load(path: str | os.PathLike, name: str | None = None) -> Trace:
    """Load a torchpool trace, an RMM logging_resource_adaptor CSV or a PyTorch memory snapshot pickle
    (gzip-compressed or not).  Raises TraceFormatError naming the file for anything else."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TraceFormatError(f"{path}: cannot read: {e.strerror}") from None
    data = raw
    if raw[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise TraceFormatError(f"{path}: broken gzip stream: {e}") from None
    if data.startswith(MAGIC):
        trace = _load_native(path, data)
    elif data[:1] == b"\x80":  # pickle protocol 2+
        trace = import_pytorch_snapshot(path, data=data)
    elif data.lstrip()[:6].lower() == b"thread":
        trace = import_rmm_csv(path, text=data.decode("utf-8", errors="replace"))
    else:
        raise TraceFormatError(f"{path}: unknown trace format: not a torchpool trace (magic {MAGIC!r}), "
                               "an RMM CSV log (header 'Thread,Time,Action,Pointer,Size,Stream') or a PyTorch "
                               "memory snapshot pickle")
    if name:
        trace.header["name"] = name
    trace.header.setdefault("name", path.name.split(".")[0])
    return trace


# ---- importers ----------------------------------------------------------------------------------

RMM_COLUMNS = ["Thread", "Time", "Action", "Pointer", "Size", "Stream"]


def _parse_int(text: str) -> int:
    text = text.strip()
    return int(text, 16) if text.lower().startswith("0x") else int(text)


def _parse_rmm_time(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        parts = text.split(":")  # older RMM: HH:MM:SS:microseconds
        if len(parts) == 4:
            h, m, s, us = (float(p) for p in parts)
            return h * 3600 + m * 60 + s + us / 1e6
        raise


def import_rmm_csv(path: str | os.PathLike, text: str | None = None) -> Trace:
    """RMM's logging_resource_adaptor CSV: columns Thread, Time, Action, Pointer, Size, Stream;
    Action is allocate, allocate failure, free or deallocate; Pointer and Stream in hex."""
    path = Path(path)
    if text is None:
        text = path.read_text()
    reader = csv.reader(io.StringIO(text))
    try:
        head = [h.strip() for h in next(reader)]
    except StopIteration:
        raise TraceFormatError(f"{path}: empty RMM log") from None
    missing = [c for c in RMM_COLUMNS if c not in head]
    if missing:
        raise TraceFormatError(f"{path}:1: RMM log header lacks column(s) {', '.join(missing)} (have {', '.join(head)})")
    col = {c: head.index(c) for c in RMM_COLUMNS}
    rows = []
    t0 = None
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < len(head):
            raise TraceFormatError(f"{path}:{lineno}: {len(row)} fields, the header has {len(head)}")
        action = row[col["Action"]].strip().lower()
        if action == "allocate":
            op = OPS["alloc"]
        elif action in ("free", "deallocate"):
            op = OPS["free"]
        elif action in ("allocate failure", "allocate_failure"):
            op = OPS["oom"]
        else:
            raise TraceFormatError(f"{path}:{lineno}: unknown Action {row[col['Action']]!r}")
        try:
            t = _parse_rmm_time(row[col["Time"]])
            addr = _parse_int(row[col["Pointer"]]) if op != OPS["oom"] else 0
            size = _parse_int(row[col["Size"]])
            stream = _parse_int(row[col["Stream"]]) if row[col["Stream"]].strip() else 0
        except ValueError as e:
            raise TraceFormatError(f"{path}:{lineno}: cannot parse {row!r}: {e}") from None
        t0 = t if t0 is None else t0
        rows.append((int(max(0.0, t - t0) * 1e9), addr, size, size if op != OPS["oom"] else size, stream, 0, op))
    rec = make_records(len(rows))
    if rows:
        arr = np.array(rows, dtype=np.uint64)
        for i, name in enumerate(("time_ns", "addr", "size", "requested", "stream")):
            rec[name] = arr[:, i]
        rec["op"] = arr[:, 6].astype(np.uint8)
        rec["requested"][rec["op"] == OPS["free"]] = rec["size"][rec["op"] == OPS["free"]]
    return Trace(rec, {"source": "rmm logging_resource_adaptor CSV", "device": "cuda"})


# PyTorch snapshot device_traces actions -> our ops. free_requested is used only when a trace has no
# free_completed (a block is reusable from free_completed on).
_PT_ACTIONS = {"alloc": 0, "free_completed": 1, "segment_alloc": 2, "segment_map": 2, "segment_free": 3,
               "segment_unmap": 3, "oom": 4}
_PT_IGNORED = {"free_requested", "snapshot", "empty_cache", "user_defined"}


def import_pytorch_snapshot(path: str | os.PathLike, data: bytes | None = None, device: int | None = None) -> Trace:
    """A pickle from torch.cuda.memory._snapshot() / _dump_snapshot(): a dict with "segments" and
    "device_traces" (one list of events per device: action, addr, size, stream, time_us, frames).
    Replays the device with the most events unless `device` is given."""
    path = Path(path)
    if data is None:
        data = path.read_bytes()
    try:
        snap = pickle.loads(data)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a broken file
        raise TraceFormatError(f"{path}: not a readable pickle: {type(e).__name__}: {e}") from None
    if not isinstance(snap, dict) or "device_traces" not in snap:
        keys = sorted(snap)[:8] if isinstance(snap, dict) else type(snap).__name__
        raise TraceFormatError(f"{path}: a pickle, but not a PyTorch memory snapshot (no 'device_traces'; found {keys}). "
                               "Record one with torch.cuda.memory._record_memory_history() and "
                               "torch.cuda.memory._dump_snapshot()")
    traces = snap["device_traces"]
    if not isinstance(traces, list) or not all(isinstance(t, list) for t in traces):
        raise TraceFormatError(f"{path}: 'device_traces' is not a list of per-device event lists")
    if device is None:
        device = max(range(len(traces)), key=lambda d: len(traces[d])) if traces else 0
    if device >= len(traces):
        raise TraceFormatError(f"{path}: no device {device} (the snapshot has {len(traces)})")
    events = traces[device]
    has_completed = any(e.get("action") == "free_completed" for e in events if isinstance(e, dict))
    rows = []
    t0 = None
    for i, e in enumerate(events):
        if not isinstance(e, dict) or "action" not in e:
            raise TraceFormatError(f"{path}: device_traces[{device}][{i}] is not an event dict with an 'action'")
        action = e["action"]
        if action == "free_requested" and not has_completed:
            op = OPS["free"]
        elif action in _PT_ACTIONS:
            op = _PT_ACTIONS[action]
        elif action in _PT_IGNORED:
            continue
        else:
            raise TraceFormatError(f"{path}: device_traces[{device}][{i}]: unknown action {action!r}")
        try:
            size = int(e.get("size", 0))
            addr = int(e.get("addr", 0))
            stream = int(e.get("stream", 0))
            t = int(e.get("time_us", 0))
        except (TypeError, ValueError) as err:
            raise TraceFormatError(f"{path}: device_traces[{device}][{i}]: bad field: {err}") from None
        t0 = t if t0 is None else t0
        requested = size if op in (0, 1) else 0
        rows.append((max(0, t - t0) * 1000, addr, size, requested, stream, device, op))
    rec = make_records(len(rows))
    if rows:
        arr = np.array(rows, dtype=np.int64)
        for k, name in enumerate(("time_ns", "addr", "size", "requested", "stream")):
            rec[name] = arr[:, k].astype(np.uint64)
        rec["device"] = arr[:, 5].astype(np.int32)
        rec["op"] = arr[:, 6].astype(np.uint8)
    return Trace(rec, {"source": "pytorch memory snapshot", "device": f"cuda:{device}"})


# ---- recording ----------------------------------------------------------------------------------

class record_trace:
    """Record every allocator event of torchpool on `device` into a trace file at `path`.

    Use as ``with record_trace(path): ...`` or ``rec = record_trace(path); rec.start(); ...; rec.stop()``.
    torchpool must be installed on the device (torchpool.install()).  The ring keeps the newest
    `capacity` events (48 bytes each: the default 1 Mi events take 48 MiB while recording); older
    ones are overwritten and counted as dropped in the header.

    stacks=True also records the Python stack of the operator that made each tensor (matched to the
    alloc events by address); off by default because it runs Python on every operator (cost in
    docs/fragmentation.md).
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", capacity: int = 1 << 20,
                 stacks: bool = False, meta: dict | None = None):
        self.path = Path(path)
        self.device = device
        self.capacity = int(capacity)
        self.stacks = stacks
        self.meta = dict(meta or {})
        self._alloc = None
        self._mode = None
        self._t0 = 0
        self.trace: Trace | None = None

    def start(self) -> "record_trace":
        from ._install import allocator

        alloc = allocator(self.device)
        if alloc is None:
            raise RuntimeError(f"torchpool.record_trace: torchpool is not installed for {self.device}; call "
                               f"torchpool.install({self.device!r}) first")
        if alloc.tracing:
            raise RuntimeError("torchpool.record_trace: this allocator is already recording")
        self._alloc = alloc
        alloc.trace_start(self.capacity)
        self._t0 = time.monotonic_ns()
        if self.stacks:
            self._mode = _StackMode()
            self._mode.__enter__()
        return self

    def stop(self) -> Trace:
        if self._alloc is None:
            raise RuntimeError("torchpool.record_trace: stop() without start()")
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
        dropped = self._alloc.trace_dropped()
        raw = self._alloc.trace_stop()
        records = np.frombuffer(raw, dtype=RECORD).copy()
        import torch

        header = {"device": self.device, "source": "torchpool.record_trace", "dropped": int(dropped),
                  "meta": {"torch": torch.__version__, "argv": sys.argv[:1], **self.meta}}
        if self._mode is not None:
            header.update(self._mode.attach(records, self._t0))
        self.trace = Trace(records, header)
        save(self.trace, self.path)
        self._alloc = None
        return self.trace

    def __enter__(self) -> "record_trace":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _StackMode:
    """Note [Python stacks of allocations]: a TorchDispatchMode notes, after each operator, the
    Python stack and the data pointers of the tensors it returned; attach() gives each alloc event
    at such an address (the latest one before the note) that stack.  Allocations made inside an
    operator that are not its outputs (workspaces) get no stack."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        notes = self.notes = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                ptrs = []
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if hasattr(t, "untyped_storage"):
                        try:
                            ptrs.append(t.untyped_storage().data_ptr())
                        except Exception:  # noqa: BLE001 - e.g. tensors without storage
                            pass
                if ptrs:
                    frames = traceback.extract_stack(limit=12)[:-1]
                    notes.append((time.monotonic_ns(), ptrs, [f"{f.filename}:{f.lineno} {f.name}" for f in frames]))
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    def attach(self, records: np.ndarray, t0: int) -> dict:
        by_addr: dict[int, list[int]] = {}
        for i in np.nonzero(records["op"] == 0)[0]:
            by_addr.setdefault(int(records["addr"][i]), []).append(int(i))
        stacks, index, pairs = [], {}, []
        times = records["time_ns"]
        for t, ptrs, frames in self.notes:
            key = tuple(frames)
            sid = index.get(key)
            for p in ptrs:
                cands = by_addr.get(p)
                if not cands:
                    continue
                best = None
                for i in cands:
                    if int(times[i]) + t0 <= t + 1_000_000:
                        best = i
                    else:
                        break
                if best is None:
                    continue
                if sid is None:
                    sid = index[key] = len(stacks)
                    stacks.append(frames)
                pairs.append([best, sid])
        return {"stacks": stacks, "event_stacks": pairs}
