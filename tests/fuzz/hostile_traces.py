"""Hostile trace files: each failure issue 11 found in the trace importers and the replay, as bytes.

Used three ways: tests/test_trace_hostile.py asserts each gets a clear TraceFormatError (regression
tests), gen_corpus() writes them into tests/fuzz/corpus/trace/ (the atheris seed corpus, with large
inputs), and fuzz_trace.py starts from that corpus.  Only numpy and the standard library: the
bytes do not depend on torchpool's code.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

MAGIC = b"TPTRACE1\n"
RMM_HEADER = "Thread,Time,Action,Pointer,Size,Stream\n"
U64 = (1 << 64) - 1


def record(op, addr=0x10000, size=4096, requested=None, time_ns=0, stream=0, device=-1) -> bytes:
    return struct.pack("<QQQQQiB3x", time_ns, addr, size, size if requested is None else requested, stream, device, op)


def native(records: list[bytes], header: dict | None = None, raw_header: bytes | None = None) -> bytes:
    hdr = {"format": "torchpool-trace", "version": 1, "records": len(records), "record_bytes": 48}
    hdr.update(header or {})
    line = raw_header if raw_header is not None else json.dumps(hdr).encode()
    return MAGIC + line + b"\n" + b"".join(records)


class _Run:
    """Unpickling it calls `fn(*args)`: what a crafted pickle does."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def rce_pickle(marker: str) -> bytes:
    """A snapshot-shaped pickle that runs `touch marker` when pickle.loads reads it (issue 11 item 1)."""
    return pickle.dumps({"segments": [], "device_traces": [[]], "x": _Run(os.system, (f"touch {marker}",))}, protocol=4)


def snapshot(events: list, protocol: int = 4, **extra) -> bytes:
    return pickle.dumps({"segments": [], "device_traces": [events], **extra}, protocol=protocol)


def ev(action="alloc", addr=1 << 30, size=512, stream=0, time_us=0, **kw) -> dict:
    return {"action": action, "addr": addr, "size": size, "stream": stream, "time_us": time_us, "frames": [], **kw}


def deep_pickle(depth: int) -> bytes:
    """{"device_traces": [[ [[[...]]] ]]} with lists nested `depth` deep, written opcode by opcode (pickle.dumps
    itself recurses)."""
    key = b"device_traces"
    return (b"\x80\x02}X" + struct.pack("<I", len(key)) + key + b"]]" + b"]" * depth + b"a" * (depth - 1)
            + b"aas.")


def rmm(*rows: str) -> bytes:
    return (RMM_HEADER + "".join(r + "\n" for r in rows)).encode()


def deep_json(depth: int) -> bytes:
    return b'{"format":"torchpool-trace","version":1,"records":0,"record_bytes":48,"meta":' + b"[" * depth + b"]" * depth + b"}"


def cases() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a regex the TraceFormatError message must match).  Names say the failure."""
    big = U64 - 99
    c: dict[str, tuple[bytes, str]] = {}
    # item 1: code in pickles (the marker path is relative: the file is inert unless unpickled)
    c["snapshot_rce_os_system"] = (rce_pickle("torchpool_fuzz_pwned"), r"refused to unpickle.*'posix\.system'")
    c["snapshot_rce_eval"] = (pickle.dumps(_Run(eval, ("1+1",)), protocol=2), r"refused to unpickle.*'(builtins|__builtin__)\.eval'")
    # item 9 / item 5: snapshot fields
    c["snapshot_size_minus_1"] = (snapshot([ev(size=-1)]), r"device_traces\[0\]\[0\]: field 'size' is -1")
    c["snapshot_size_2_64_minus_1"] = (snapshot([ev(size=U64)]), r"field 'size' is 18446744073709551615")
    c["snapshot_size_2_64"] = (snapshot([ev(size=1 << 64)]), r"field 'size' is 18446744073709551616")
    c["snapshot_addr_str"] = (snapshot([ev(addr="0x10")]), r"field 'addr' is str")
    c["snapshot_time_float"] = (snapshot([ev(time_us=1.5)]), r"field 'time_us' is float")
    c["snapshot_action_int"] = (snapshot([ev(action=7)]), r"field 'action' is a int")
    c["snapshot_event_list"] = (snapshot([[1, 2]]), r"device_traces\[0\]\[0\] is not an event dict")
    c["snapshot_traces_dict"] = (pickle.dumps({"device_traces": {"0": []}}), r"not a list of per-device event lists")
    c["snapshot_mixed_keys"] = (pickle.dumps({1: 2, "a": 3}), r"not a PyTorch memory snapshot")
    c["snapshot_not_dict"] = (pickle.dumps([1, 2, 3]), r"not a PyTorch memory snapshot")
    c["snapshot_deep_nesting"] = (deep_pickle(100_000), r"device_traces\[0\]\[0\] is not an event dict")
    # found by fuzz_trace.py: a memo index of 808215909 made the C unpickler allocate 12 GiB
    c["snapshot_memo_index"] = (b"\x80\x04]\x94r\x65\x65\x2c\x30.", r"not a PyTorch memory snapshot")
    c["snapshot_binbytes8_huge"] = (b"\x80\x04\x8e" + struct.pack("<Q", 1 << 62) + b"ab.", r"not a readable pickle")
    # found by fuzz_trace.py: BYTEARRAY8 of 4 GiB in 15 bytes (the Python unpickler allocated it first)
    c["snapshot_bytearray8_huge"] = (b"\x80\x05\x96" + struct.pack("<Q", 1 << 32) + b"ab.", r"not a readable pickle")
    c["snapshot_truncated"] = (snapshot([ev()])[:-7], r"not a readable pickle")
    # item 9 / item 5: native records and header
    c["native_size_2_64_minus_100"] = (native([record(0, size=big), record(1, size=big)]),
                                       r"record 0 \(alloc\): field 'size' is 18446744073709551516")
    c["native_size_2_62"] = (native([record(0, size=1 << 62)]), r"record 0 \(alloc\): field 'size' is 4611686018427387904")
    c["native_requested_huge"] = (native([record(0, size=4096, requested=U64)]), r"record 0 \(alloc\): field 'requested'")
    c["native_bad_op"] = (native([record(0), record(9)]), r"record 1 has unknown op 9")
    c["native_header_list"] = (native([], raw_header=b"[1,2,3]"), r"header \(line 2\) is a JSON list")
    c["native_header_deep_json"] = (native([], raw_header=deep_json(100_000)), r"not JSON: RecursionError")
    c["native_records_str"] = (native([], {"records": "3"}), r"header field 'records' is '3'")
    c["native_records_negative"] = (native([], {"records": -1}), r"header field 'records' is -1")
    c["native_records_float"] = (native([], {"records": 1.0}), r"header field 'records' is 1.0")
    c["native_records_huge"] = (native([], {"records": 1 << 62}), r"exceeds the limit max_events")
    c["native_meta_list"] = (native([record(0)], {"meta": [1]}), r"header field 'meta' is a list")
    c["native_name_int"] = (native([record(0)], {"name": 5}), r"header field 'name' is a int")
    c["native_event_stacks_out_of_range"] = (native([record(0)], {"stacks": [["a.py:1 f"]], "event_stacks": [[5, 0]]}),
                                             r"header field 'event_stacks'\[0\]")
    c["native_stacks_not_strings"] = (native([record(0)], {"stacks": [[1]]}), r"header field 'stacks'\[0\]")
    c["native_bad_utf8_header"] = (native([], raw_header=b'{"a":"\xff\xfe"}'), r"not JSON")
    c["native_version_bool"] = (native([], {"version": True}), r"version True")
    # item 9 / item 5 / issue 13: RMM logs
    c["rmm_size_2_64_minus_1"] = (rmm(f"1,14:21:19.998533,allocate,0x30a000000,{U64},0x2"),
                                  r":2: cannot parse.*Size 18446744073709551615 is more than")
    c["rmm_size_2_64"] = (rmm(f"1,14:21:19.998533,allocate,0x30a000000,{1 << 64},0x2"), r":2: cannot parse.*Size")
    c["rmm_size_minus_1"] = (rmm("1,14:21:19.998533,allocate,0x30a000000,-1,0x2"), r":2: cannot parse.*Size '-1'")
    c["rmm_size_underscore"] = (rmm("1,14:21:19.998533,allocate,0x30a000000,1_000,0x2"), r":2: cannot parse.*Size")
    c["rmm_time_nan"] = (rmm("1,nan,allocate,0x30a000000,256,0x2"), r":2: cannot parse.*Time 'nan'")
    c["rmm_time_inf"] = (rmm("1,inf,allocate,0x30a000000,256,0x2"), r":2: cannot parse.*Time 'inf'")
    c["rmm_time_1e400"] = (rmm("1,1e400,allocate,0x30a000000,256,0x2"), r":2: cannot parse.*Time")
    c["rmm_time_bad_clock"] = (rmm("1,99:99:99.1,allocate,0x30a000000,256,0x2"), r":2: cannot parse.*not a time of day")
    c["rmm_pointer_nil_allocate"] = (rmm("1,14:21:19.998533,allocate,(nil),256,0x2"), r":2: cannot parse.*Pointer '\(nil\)'")
    c["rmm_pointer_too_big"] = (rmm("1,14:21:19.998533,free,0x10000000000000000,256,0x2"), r":2: cannot parse.*Pointer")
    c["rmm_stream_garbage"] = (rmm("1,14:21:19.998533,allocate,0x30a000000,256,zz"), r":2: cannot parse.*Stream 'zz'")
    c["rmm_nul_byte"] = (rmm("1,14:21:19.998533,allocate,0x30a\x00000,256,0x2"), r"cannot parse|not CSV")
    c["rmm_huge_field"] = (rmm("1,14:21:19.998533,allocate,0x30a000000,256,0x2", '1,"' + "x" * 200_000 + '"'),
                           r":3: not CSV: field larger than field limit|:3: .*fields")
    c["rmm_short_row"] = (rmm("1,14:21:19.998533,allocate"), r":2: 3 fields, the header has 6")
    c["rmm_unknown_action"] = (rmm("1,14:21:19.998533,explode,0x30a000000,256,0x2"), r":2: unknown Action 'explode'")
    # item 7: small files that claimed huge memory (with a small limit in the tests; the corpus gets them too)
    return c


def gzip_bomb(decompressed: int, payload: bytes = b"\0") -> bytes:
    """A gzip stream of `decompressed` bytes of a repeated payload, built in chunks (small memory)."""
    import zlib

    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = (payload * ((1 << 20) // len(payload) + 1))[: 1 << 20]
    out, left = [], decompressed
    while left > 0:
        n = min(left, len(chunk))
        out.append(co.compress(chunk[:n]))
        left -= n
    out.append(co.flush())
    return b"".join(out)


def replay_cases() -> dict[str, bytes]:
    """Traces that load (every field in range) but the replay must refuse or bound."""
    tib = 1 << 40
    return {
        # 2^42 live bytes in 1-TiB blocks: live would exceed the replay's bound
        "replay_live_over_bound": native([record(0, addr=0x1000 * (i + 1), size=tib) for i in range(5)]),
        # 3 GiB live: past the default max_replay_bytes (2 GiB) for system allocators (the 145-byte 2.3 GB)
        "replay_glibc_3gib": native([record(0, addr=0x1000 * (i + 1), size=1 << 30) for i in range(3)]),
        # more distinct streams than the replay accepts
        "replay_many_streams": gzip.compress(native([record(0, addr=0x1000 * (i + 1), size=64, stream=i)
                                                     for i in range(70_000)]), 9, mtime=0),
    }


def large_seeds() -> dict[str, bytes]:
    """Valid inputs larger than 8 KB (small-input fuzzing missed what only big inputs reach)."""
    recs = []
    for i in range(2000):
        recs.append(record(0, addr=0x100000 + 0x1000 * (i % 300), size=256 + 64 * (i % 50), time_ns=i))
        if i % 3 == 0:
            recs.append(record(1, addr=0x100000 + 0x1000 * ((i + 7) % 300), size=256, time_ns=i))
    stacks = [[f"train.py:{k} step", f"model.py:{k * 3} forward"] for k in range(50)]
    rows = []
    for i in range(1500):
        rows.append(f"1979932,14:21:{19 + i // 1000:02d}.{i % 1000:06d},allocate,0x{0x30a000000 + 0x1000 * i:x},{256 * (i % 40 + 1)},0x2")
        if i % 2:
            rows.append(f"1979932,14:21:{19 + i // 1000:02d}.{i % 1000:06d},free,0x{0x30a000000 + 0x1000 * (i - 1):x},"
                        f"{256 * ((i - 1) % 40 + 1)},0x2")
    events = []
    for i in range(1200):
        events.append(ev("alloc", addr=(1 << 30) + 4096 * i, size=512 + i, time_us=i,
                         frames=[{"filename": "x.py", "line": i, "name": "f"}]))
        if i % 2:
            events.append(ev("free_requested", addr=(1 << 30) + 4096 * (i - 1), size=511 + i, time_us=i))
            events.append(ev("free_completed", addr=(1 << 30) + 4096 * (i - 1), size=511 + i, time_us=i))
    return {
        "large_native": native(recs, {"stacks": stacks, "event_stacks": [[k, k % 50] for k in range(0, 2000, 7)],
                                      "meta": {"workload": "seed"}}),
        "large_native_gz": gzip.compress(native(recs), 6, mtime=0),
        "large_rmm": rmm(*rows),
        "large_snapshot_p4": snapshot(events, protocol=4),
        "large_snapshot_p2": snapshot(events[:400], protocol=2),
        "large_deep_json": native([], raw_header=deep_json(20_000)),
    }


def gen_corpus(out: str | os.PathLike) -> int:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    items = {k: v[0] for k, v in cases().items()}
    items.update(replay_cases())
    items.update(large_seeds())
    items["gzip_bomb_64m"] = gzip_bomb(64 << 20)  # ~64 KB of gzip (the 3 MB / 21.7 GiB failure, scaled)
    for name, data in items.items():
        (out / name).write_bytes(data)
        n += 1
    return n


if __name__ == "__main__":
    import sys

    print(gen_corpus(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "corpus" / "trace"), "files")
