"""Allocation traces: record torchpool's events to a file, load them, import other allocators' logs.

    with torchpool.record_trace("run.tptrace"):       # or rec = record_trace(p); rec.start(); ...; rec.stop()
        train_step()
    trace = torchpool.trace.load("run.tptrace")        # also RMM CSV logs and PyTorch snapshot pickles

Loading never runs anything a file names (snapshots go through a restricted unpickler, Note
[Restricted unpickler]) and never holds more than TraceLimits allows (Note [Trace limits]); every
field is checked and any problem is a TraceFormatError naming the file, record/line/event and field.

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
import re
import struct
import sys
import time
import traceback
import zlib
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
    (and the line, record or event and the field where it went wrong)."""


class TraceLimitError(TraceFormatError):
    """A trace that would make torchpool allocate more than a limit of TraceLimits allows; the message
    names the limit and how to raise it."""


# Note [Trace limits]
# -------------------
# Rationale: a trace is a file someone hands us; a few MB of gzip can decompress to tens of GB, and a
# short file can describe terabytes of allocations.  Approach: load() never holds more than
# TraceLimits allows: the decompressed size (max_bytes, checked while decompressing, so a gzip bomb
# stops at the limit), the number of events (max_events), the native header line
# (max_header_bytes) and PyTorch snapshot pickles (max_pickle_bytes: unpickled objects cost
# several times the pickle, up to ~40x for crafted ones, so they get a smaller limit).  Each record
# size must be at most MAX_ALLOC_BYTES (1 TiB, the replay's own bound, csrc/replay/replay.h).  What
# a replay may touch is bounded separately (max_replay_bytes in torchpool.replay).  Every limit
# exceeded is a TraceLimitError saying which limit and how to raise it.
@dataclass(frozen=True)
class TraceLimits:
    max_bytes: int = 1 << 30          # decompressed bytes of one trace file
    max_events: int = 1 << 25         # records / CSV rows / snapshot events of one trace
    max_header_bytes: int = 64 << 20  # the JSON header line of a torchpool trace
    max_pickle_bytes: int = 128 << 20  # a PyTorch memory snapshot pickle (decompressed)

    def __post_init__(self):
        for f in ("max_bytes", "max_events", "max_header_bytes", "max_pickle_bytes"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TraceLimits.{f} must be an int >= 0, got {v!r}")


DEFAULT_LIMITS = TraceLimits()
# The largest block a trace may hold: the replay's kMaxReplayAllocBytes (csrc/replay/replay.h).
MAX_ALLOC_BYTES = 1 << 40
_U64 = (1 << 64) - 1
_LIMIT_FLAGS = {"max_bytes": "--max-trace-bytes", "max_events": "--max-trace-events",
                "max_header_bytes": "--max-trace-header-bytes", "max_pickle_bytes": "--max-trace-pickle-bytes"}


def _limit_error(path, what: str, limit: str, value: int) -> TraceLimitError:
    return TraceLimitError(
        f"{path}: {what} exceeds the limit {limit}={value} (Note [Trace limits]); if the file is trusted, raise it: "
        f"torchpool.trace.load(path, limits=torchpool.trace.TraceLimits({limit}=N)) or "
        f"`torchpool bench fragmentation {_LIMIT_FLAGS[limit]} N`")


@dataclass
class Trace:
    records: np.ndarray  # dtype RECORD
    header: dict = field(default_factory=dict)
    path: str | None = field(default=None, repr=False)  # the file load() read it from

    @property
    def name(self) -> str:
        meta = self.header.get("meta")
        name = self.header.get("name") or (meta.get("workload") if isinstance(meta, dict) else None)
        return str(name) if name else "trace"

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


class _Records:
    """Builds a record array row by row in bounded chunks (a Python tuple per event would cost ~5x the
    records), refusing more than max_events."""

    _CHUNK = 1 << 16

    def __init__(self, path, limits: TraceLimits):
        self.path, self.limits = path, limits
        self.rows: list[tuple] = []
        self.chunks: list[np.ndarray] = []
        self.n = 0

    def add(self, time_ns, addr, size, requested, stream, device, op) -> None:
        if self.n >= self.limits.max_events:
            raise _limit_error(self.path, f"more than {self.limits.max_events} events", "max_events",
                               self.limits.max_events)
        self.n += 1
        self.rows.append((time_ns, addr, size, requested, stream, device, op, (0, 0, 0)))
        if len(self.rows) >= self._CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.chunks.append(np.array(self.rows, dtype=RECORD))
            self.rows = []

    def array(self) -> np.ndarray:
        self._flush()
        return np.concatenate(self.chunks) if self.chunks else make_records(0)


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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_header(path: Path, header, n_limit: int) -> dict:
    """Every field of the native header that torchpool reads, with the field named on error."""
    if not isinstance(header, dict):
        raise TraceFormatError(f"{path}: torchpool trace header (line 2) is a JSON {type(header).__name__}, not an object")
    if header.get("format") != "torchpool-trace":
        raise TraceFormatError(f"{path}: header field 'format' is {header.get('format')!r}, not 'torchpool-trace'")
    if header.get("version") != VERSION or not _is_int(header.get("version")):
        raise TraceFormatError(f"{path}: torchpool trace version {header.get('version')!r}; this torchpool reads "
                               f"version {VERSION}")
    if header.get("record_bytes") != RECORD.itemsize or not _is_int(header.get("record_bytes")):
        raise TraceFormatError(f"{path}: header field 'record_bytes' is {header.get('record_bytes')!r}, expected "
                               f"{RECORD.itemsize}")
    n = header.get("records")
    if not _is_int(n) or n < 0:
        raise TraceFormatError(f"{path}: header field 'records' is {n!r}, not a count")
    if n > n_limit:
        raise _limit_error(path, f"header field 'records' ({n})", "max_events", n_limit)
    for key, typ in (("name", str), ("device", str), ("source", str), ("meta", dict), ("stacks", list),
                     ("event_stacks", list)):
        if key in header and header[key] is not None and not isinstance(header[key], typ):
            raise TraceFormatError(f"{path}: header field {key!r} is a {type(header[key]).__name__}, "
                                   f"expected a {typ.__name__}")
    if "dropped" in header and not (_is_int(header["dropped"]) and header["dropped"] >= 0):
        raise TraceFormatError(f"{path}: header field 'dropped' is {header['dropped']!r}, not a count")
    stacks = header.get("stacks") or []
    for i, s in enumerate(stacks):
        if not isinstance(s, list) or not all(isinstance(f, str) for f in s):
            raise TraceFormatError(f"{path}: header field 'stacks'[{i}] is not a list of strings")
    for i, pair in enumerate(header.get("event_stacks") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(x) for x in pair)
                and 0 <= pair[0] < n and 0 <= pair[1] < len(stacks)):
            raise TraceFormatError(f"{path}: header field 'event_stacks'[{i}] is {pair!r}, not [record index < {n}, "
                                   f"stack index < {len(stacks)}]")
    return header


def _check_records(path: Path, records: np.ndarray) -> None:
    bad = np.nonzero(records["op"] >= len(OPS))[0]
    if len(bad):
        raise TraceFormatError(f"{path}: record {int(bad[0])} has unknown op {int(records['op'][bad[0]])}")
    blocks = records["op"] <= OPS["free"]
    for fld in ("size", "requested"):
        bad = np.nonzero(blocks & (records[fld] > MAX_ALLOC_BYTES))[0]
        if len(bad):
            i = int(bad[0])
            raise TraceFormatError(f"{path}: record {i} ({OP_NAMES[int(records['op'][i])]}): field {fld!r} is "
                                   f"{int(records[fld][i])}, more than {MAX_ALLOC_BYTES} (1 TiB, the largest block "
                                   "torchpool replays)")


def _load_native(path: Path, data: bytes, limits: TraceLimits = DEFAULT_LIMITS) -> Trace:
    if not data.startswith(MAGIC):
        raise TraceFormatError(f"{path}: not a torchpool trace (bad magic {data[:9]!r})")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + limits.max_header_bytes + 1)
    if end < 0:
        if len(data) > len(MAGIC) + limits.max_header_bytes:
            raise _limit_error(path, "the header line (line 2)", "max_header_bytes", limits.max_header_bytes)
        raise TraceFormatError(f"{path}: truncated torchpool trace (no header line)")
    try:
        header = json.loads(data[len(MAGIC):end])
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, nesting too deep
        raise TraceFormatError(f"{path}: torchpool trace header (line 2) is not JSON: {type(e).__name__}: "
                               f"{str(e)[:200]}") from None
    header = _check_header(path, header, limits.max_events)
    body = memoryview(data)[end + 1:]
    n = header["records"]
    if len(body) != n * RECORD.itemsize:
        raise TraceFormatError(f"{path}: header promises {n} records ({n * RECORD.itemsize} bytes) but the file holds "
                               f"{len(body)} bytes: truncated or corrupt")
    records = np.frombuffer(body, dtype=RECORD).copy()
    _check_records(path, records)
    return Trace(records, header)


def _gunzip(path: Path, raw: bytes, limit: int) -> bytes:
    """Decompress every gzip member of `raw`, never producing more than `limit` bytes."""
    chunks, total, data = [], 0, raw
    try:
        while True:
            d = zlib.decompressobj(31)
            buf = data
            while not d.eof:
                chunk = d.decompress(buf, limit + 1 - total)
                progressed = bool(chunk) or len(d.unconsumed_tail) != len(buf)
                buf = d.unconsumed_tail
                if chunk:
                    total += len(chunk)
                    if total > limit:
                        raise _limit_error(path, f"the decompressed trace (more than {limit} bytes)", "max_bytes", limit)
                    chunks.append(chunk)
                if not progressed or (not buf and not chunk):
                    break
            if not d.eof:
                raise TraceFormatError(f"{path}: broken gzip stream: truncated (ends before the gzip trailer)")
            data = d.unused_data
            if not data.strip(b"\0"):
                break
            if data[:2] != b"\x1f\x8b":
                raise TraceFormatError(f"{path}: broken gzip stream: {len(data)} bytes of trailing garbage")
    except zlib.error as e:
        raise TraceFormatError(f"{path}: broken gzip stream: {e}") from None
    return b"".join(chunks)


def _read(path: Path, limits: TraceLimits) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(limits.max_bytes + 1)
    except OSError as e:
        raise TraceFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > limits.max_bytes:
        raise _limit_error(path, f"the file (more than {limits.max_bytes} bytes)", "max_bytes", limits.max_bytes)
    if raw[:2] == b"\x1f\x8b":
        return _gunzip(path, raw, limits.max_bytes)
    return raw


def load(path: str | os.PathLike, name: str | None = None, limits: TraceLimits | None = None) -> Trace:
    """Load a torchpool trace, an RMM logging_resource_adaptor CSV or a PyTorch memory snapshot pickle
    (gzip-compressed or not).  Raises TraceFormatError naming the file (and record, line or event, and
    field) for anything else, TraceLimitError when the file exceeds `limits` (Note [Trace limits]).
    Nothing in the file is executed: snapshots are read by a restricted unpickler."""
    path = Path(path)
    limits = limits or DEFAULT_LIMITS
    trace = _parse(path, _read(path, limits), limits)
    if name:
        trace.header["name"] = name
    if not isinstance(trace.header.get("name"), str) or not trace.header.get("name"):
        trace.header["name"] = path.name.split(".")[0] or "trace"
    trace.path = str(path)
    return trace


def loads(data: bytes, name: str | None = None, limits: TraceLimits | None = None, path: str = "<bytes>") -> Trace:
    """load() of a file's contents (gzip-compressed or not); errors name `path`."""
    limits = limits or DEFAULT_LIMITS
    data = bytes(data)
    if len(data) > limits.max_bytes:
        raise _limit_error(path, f"the data (more than {limits.max_bytes} bytes)", "max_bytes", limits.max_bytes)
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(path, data, limits.max_bytes)
    trace = _parse(path, data, limits)
    if name:
        trace.header["name"] = name
    if not isinstance(trace.header.get("name"), str) or not trace.header.get("name"):
        trace.header["name"] = "trace"
    return trace


def _parse(path, data: bytes, limits: TraceLimits) -> Trace:
    if data.startswith(MAGIC):
        return _load_native(path, data, limits)
    if data[:1] == b"\x80":  # pickle protocol 2+
        return import_pytorch_snapshot(path, data=data, limits=limits)
    if data.lstrip().removeprefix(b"\xef\xbb\xbf")[:6].lower() == b"thread":
        return import_rmm_csv(path, data=data, limits=limits)
    raise TraceFormatError(f"{path}: unknown trace format: not a torchpool trace (magic {MAGIC!r}), "
                           "an RMM CSV log (header 'Thread,Time,Action,Pointer,Size,Stream') or a PyTorch "
                           "memory snapshot pickle")


# ---- importers ----------------------------------------------------------------------------------

RMM_COLUMNS = ["Thread", "Time", "Action", "Pointer", "Size", "Stream"]
_INT_RE = re.compile(r"0[xX][0-9a-fA-F]{1,16}|[0-9]{1,20}")
# Note [RMM log time]: logging_resource_adaptor's pattern is "%t,%H:%M:%S.%f,%v": the thread id, the
# wall-clock time of day with microseconds, then the event.  RMM's docs also show epoch seconds
# (1634567890.123456), and older logs HH:MM:SS:microseconds; all three are read.  Times of day wrap
# at midnight: a time more than 12 h before the previous one is taken as the next day.
_CLOCK_RE = re.compile(r"([0-9]{1,2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9})|:([0-9]{1,6}))?")
_EPOCH_RE = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")


def _parse_uint(text: str, what: str, maximum: int = _U64) -> int:
    t = text.strip()
    if not _INT_RE.fullmatch(t):
        raise ValueError(f"{what} {text!r} is not a decimal or 0x-hex integer")
    v = int(t, 16) if t[:2].lower() == "0x" else int(t)
    if v > maximum:
        raise ValueError(f"{what} {v} is more than {maximum}")
    return v


def _parse_rmm_time(text: str) -> tuple[int, bool]:
    """(nanoseconds, is a time of day)."""
    t = text.strip()
    m = _CLOCK_RE.fullmatch(t)
    if m:
        h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if h > 23 or mi > 59 or s > 60:
            raise ValueError(f"Time {text!r} is not a time of day")
        frac = m.group(4)
        ns = int(frac.ljust(9, "0")) if frac else int(m.group(5) or 0) * 1000
        return ((h * 60 + mi) * 60 + s) * 1_000_000_000 + ns, True
    if _EPOCH_RE.fullmatch(t):
        whole, _, frac = t.partition(".")
        return int(whole) * 1_000_000_000 + int(frac.ljust(9, "0") or 0), False
    raise ValueError(f"Time {text!r} is neither HH:MM:SS.ffffff nor seconds since the epoch")


def import_rmm_csv(path: str | os.PathLike, text: str | None = None, *, data: bytes | None = None,
                   limits: TraceLimits | None = None) -> Trace:
    """RMM's logging_resource_adaptor CSV: columns Thread, Time, Action, Pointer, Size, Stream;
    Action is allocate, allocate failure, free or deallocate; Pointer in hex ((nil) for a failure),
    Stream in hex or decimal, Time as HH:MM:SS.ffffff (what RMM writes) or epoch seconds
    (Note [RMM log time])."""
    path = Path(path)
    limits = limits or DEFAULT_LIMITS
    if text is None and data is None:
        data = _read(path, limits)
    stream_in = (io.StringIO(text) if text is not None else
                 io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", errors="replace", newline=""))
    reader = csv.reader(stream_in)
    out = _Records(path, limits)
    lineno = 1
    try:
        try:
            head = [h.strip() for h in next(reader)]
        except StopIteration:
            raise TraceFormatError(f"{path}: empty RMM log") from None
        missing = [c for c in RMM_COLUMNS if c not in head]
        if missing:
            raise TraceFormatError(f"{path}:1: RMM log header lacks column(s) {', '.join(missing)} "
                                   f"(have {', '.join(h[:40] for h in head[:16])})")
        col = {c: head.index(c) for c in RMM_COLUMNS}
        t0 = prev = None
        day = 0
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
                raise TraceFormatError(f"{path}:{lineno}: unknown Action {row[col['Action']][:80]!r}")
            try:
                t, clock = _parse_rmm_time(row[col["Time"]])
                if clock and prev is not None and t + day < prev - 12 * 3600 * 10**9:
                    day += 24 * 3600 * 10**9  # Note [RMM log time]: past midnight
                t += day if clock else 0
                ptr = row[col["Pointer"]].strip()
                if op == OPS["oom"] or (op == OPS["free"] and ptr == "(nil)"):
                    addr = 0  # printf's %p of a null pointer; a free of null frees nothing
                else:
                    addr = _parse_uint(ptr, "Pointer")
                size = _parse_uint(row[col["Size"]], "Size",
                                   MAX_ALLOC_BYTES if op != OPS["oom"] else _U64)
                st = row[col["Stream"]].strip()
                stream = _parse_uint(st, "Stream") if st and st != "(nil)" else 0  # %p of the default stream
            except ValueError as e:
                raise TraceFormatError(f"{path}:{lineno}: cannot parse {','.join(row)[:200]!r}: {e}") from None
            t0 = t if t0 is None else t0
            prev = t
            dt = max(0, t - t0)
            if dt > _U64:
                raise TraceFormatError(f"{path}:{lineno}: Time {row[col['Time']]!r} is {dt / 1e9:.0f} s after the "
                                       "first event")
            out.add(dt, addr, size, size, stream, 0, op)
    except csv.Error as e:
        raise TraceFormatError(f"{path}:{lineno + 1}: not CSV: {e}") from None
    return Trace(out.array(), {"source": "rmm logging_resource_adaptor CSV", "device": "cuda"})


# PyTorch snapshot device_traces actions -> our ops. free_requested is used only when a trace has no
# free_completed (a block is reusable from free_completed on).
_PT_ACTIONS = {"alloc": 0, "free_completed": 1, "segment_alloc": 2, "segment_map": 2, "segment_free": 3,
               "segment_unmap": 3, "oom": 4}
_PT_IGNORED = {"free_requested", "snapshot", "empty_cache", "user_defined"}


# Note [Restricted unpickler]
# ---------------------------
# Rationale: a pickle runs whatever callable its GLOBAL/REDUCE opcodes name (os.system, eval, ...);
# pickle.loads of a file someone hands us is code execution.  PyTorch's memory snapshots hold only
# dicts, lists, tuples, str, int, float, bool and None, which pickle writes with opcodes that name no
# global.  Approach: an unpickler whose find_class admits only a few builtin data types that older
# protocols spell as globals (set, frozenset, bytearray, complex, OrderedDict, and _codecs.encode
# with latin-1, protocol 2's spelling of bytes) and refuses every other global before anything is
# imported or called; persistent ids are refused too.  The file never reaches pickle.loads.
# It subclasses the pure-Python pickle._Unpickler, not the C one: the C unpickler sizes its memo
# array by the largest index a PUT names, so a 5-byte LONG_BINPUT 808215909 made it allocate and
# clear 12 GiB (found by tests/fuzz/fuzz_trace.py; corpus file snapshot_memo_index); the Python one
# keeps the memo in a dict and reads every length-prefixed argument from the data it has, except
# BYTEARRAY8 (protocol 5), which allocates the length it declares before reading: a 15-byte pickle
# declaring 4 GiB exhausted the fuzzer's memory (corpus file snapshot_bytearray8_huge), so that opcode
# is read like the others here.  It is about 3x slower (a 16 MB snapshot of 100k events: ~4 s here
# against ~1.5 s).
# Limitation: unpickled objects still cost memory, several times the pickle (up to ~40x for
# crafted ones), bounded through max_pickle_bytes (Note [Trace limits]).
def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"refused global _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin-1", errors if errors in ("strict",) else "strict")


_SAFE_GLOBALS = {
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex, ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.global_name = f"{module}.{name}"


class _SnapshotUnpickler(pickle._Unpickler):
    """Note [Restricted unpickler]."""

    def find_class(self, module, name):
        # protocol <= 2 spells builtins as Python 2's __builtin__ (the default find_class maps it)
        fn = _SAFE_GLOBALS.get(("builtins" if module == "__builtin__" else module, name))
        if fn is None:
            raise _RefusedGlobal(str(module)[:100], str(name)[:100])
        return fn

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id (snapshots hold none)")

    def _load_bytearray8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)  # only what the pickle holds, never the declared length up front
        if len(data) != n:
            raise pickle.UnpicklingError(f"BYTEARRAY8 declares {n} bytes but the pickle holds {len(data)}")
        self.append(bytearray(data))

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8


def safe_unpickle(path, data: bytes):
    """Unpickle `data` admitting only builtin data types (Note [Restricted unpickler]); TraceFormatError
    naming `path` and the refused global for anything else."""
    try:
        return _SnapshotUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as e:
        raise TraceFormatError(f"{path}: refused to unpickle: the pickle names the global {e.global_name!r}; a "
                               "PyTorch memory snapshot holds only dicts, lists, str and numbers, and torchpool "
                               "never imports or calls anything a trace names (Note [Restricted unpickler])") from None
    except RecursionError:
        raise TraceFormatError(f"{path}: not a readable pickle: nested too deeply") from None
    except MemoryError:
        raise TraceFormatError(f"{path}: not a readable pickle: out of memory while unpickling") from None
    except Exception as e:  # noqa: BLE001 - any other unpickling failure is a broken file
        raise TraceFormatError(f"{path}: not a readable pickle: {type(e).__name__}: {str(e)[:200]}") from None


def _event_uint(path, where: str, e: dict, key: str, maximum: int = _U64) -> int:
    v = e.get(key, 0)
    if v is None:
        v = 0
    if not _is_int(v):
        raise TraceFormatError(f"{path}: {where}: field {key!r} is {type(v).__name__} {str(v)[:40]!r}, not an integer")
    if v < 0 or v > maximum:
        raise TraceFormatError(f"{path}: {where}: field {key!r} is {v}, outside [0, {maximum}]")
    return v


def import_pytorch_snapshot(path: str | os.PathLike, data: bytes | None = None, device: int | None = None,
                            limits: TraceLimits | None = None) -> Trace:
    """A pickle from torch.cuda.memory._snapshot() / _dump_snapshot() (or torchpool.dump_snapshot): a
    dict with "segments" and "device_traces" (one list of events per device: action, addr, size,
    stream, time_us, frames).  Replays the device with the most events unless `device` is given.
    Read with a restricted unpickler (Note [Restricted unpickler]): nothing in the file is run."""
    path = Path(path)
    limits = limits or DEFAULT_LIMITS
    if data is None:
        data = _read(path, limits)
    if len(data) > limits.max_pickle_bytes:
        raise _limit_error(path, f"the snapshot pickle ({len(data)} bytes)", "max_pickle_bytes",
                           limits.max_pickle_bytes)
    snap = safe_unpickle(path, data)
    if not isinstance(snap, dict) or "device_traces" not in snap:
        keys = sorted(repr(k)[:40] for k in snap)[:8] if isinstance(snap, dict) else type(snap).__name__
        raise TraceFormatError(f"{path}: a pickle, but not a PyTorch memory snapshot (no 'device_traces'; found {keys}). "
                               "Record one with torch.cuda.memory._record_memory_history() and "
                               "torch.cuda.memory._dump_snapshot()")
    traces = snap["device_traces"]
    if not isinstance(traces, list) or not all(isinstance(t, list) for t in traces):
        raise TraceFormatError(f"{path}: 'device_traces' is not a list of per-device event lists")
    if device is None:
        device = max(range(len(traces)), key=lambda d: len(traces[d])) if traces else 0
    if not _is_int(device) or device < 0 or (traces and device >= len(traces)) or device > (1 << 31) - 1:
        raise TraceFormatError(f"{path}: no device {device!r} (the snapshot has {len(traces)})")
    events = traces[device] if traces else []
    if len(events) > limits.max_events:
        raise _limit_error(path, f"device_traces[{device}] ({len(events)} events)", "max_events", limits.max_events)
    has_completed = any(isinstance(e, dict) and e.get("action") == "free_completed" for e in events)
    out = _Records(path, limits)
    t0 = None
    for i, e in enumerate(events):
        where = f"device_traces[{device}][{i}]"
        if not isinstance(e, dict) or "action" not in e:
            raise TraceFormatError(f"{path}: {where} is not an event dict with an 'action'")
        action = e["action"]
        if not isinstance(action, str):
            raise TraceFormatError(f"{path}: {where}: field 'action' is a {type(action).__name__}, not a string")
        if action == "free_requested" and not has_completed:
            op = OPS["free"]
        elif action in _PT_ACTIONS:
            op = _PT_ACTIONS[action]
        elif action in _PT_IGNORED:
            continue
        else:
            raise TraceFormatError(f"{path}: {where}: unknown action {action[:80]!r}")
        size = _event_uint(path, where, e, "size", MAX_ALLOC_BYTES if op in (0, 1) else _U64)
        addr = _event_uint(path, where, e, "addr")
        stream = _event_uint(path, where, e, "stream")
        t = _event_uint(path, where, e, "time_us", _U64 // 1000)
        t0 = t if t0 is None else t0
        requested = size if op in (0, 1) else 0
        out.add(max(0, t - t0) * 1000, addr, size, requested, stream, device, op)
    return Trace(out.array(), {"source": "pytorch memory snapshot", "device": f"cuda:{device}"})


# ---- recording ----------------------------------------------------------------------------------

class record_trace:
    """Record every allocator event of torchpool on `device` into a trace file at `path`.

    Use as ``with record_trace(path): ...`` or ``rec = record_trace(path); rec.start(); ...; rec.stop()``.
    torchpool must be installed on the device (torchpool.install()).  The ring keeps the newest
    `capacity` events (48 bytes each: the default 1 Mi events take 48 MiB while recording); older
    ones are overwritten and counted as dropped in the header.

    stacks=True also records the Python stack of the operator that made each tensor (matched to the
    alloc events by address); off by default because it runs Python on every operator (cost in
    docs/reference/fragmentation.md).
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
        from .._install import allocator

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
