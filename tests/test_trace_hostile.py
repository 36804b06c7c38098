"""Hostile traces (issue 11 items 1, 5, 7, 9): every importer and the replay answer a crafted file with
a TraceFormatError naming the file and the record/line/event and field, never run code, never
allocate without bound.  The files come from tests/fuzz/hostile_traces.py, which also writes them
into the atheris seed corpus (tests/fuzz/corpus/trace)."""

import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from torchpool.tracing import replay as R
from torchpool.tracing import trace as T

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import hostile_traces as H  # noqa: E402

CASES = H.cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_file_gets_a_trace_format_error(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # the RCE pickle would `touch torchpool_fuzz_pwned` here
    data, message = CASES[name]
    for variant, blob in (("plain", data), ("gz", gzip.compress(data))):
        p = tmp_path / f"{name}.{variant}"
        p.write_bytes(blob)
        with pytest.raises(T.TraceFormatError, match=message) as e:
            T.load(p)
        assert str(p) in str(e.value)
        with pytest.raises(T.TraceFormatError, match=message):
            T.loads(blob)
    assert not (tmp_path / "torchpool_fuzz_pwned").exists()


def test_crafted_pickle_would_run_code_but_does_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = H.rce_pickle(str(tmp_path / "pwned_by_pickle"))
    # The file is a real exploit: the standard unpickler runs the command.
    pickle.loads(data)
    assert (tmp_path / "pwned_by_pickle").exists()
    (tmp_path / "pwned_by_pickle").unlink()
    p = tmp_path / "run.tptrace.gz"
    p.write_bytes(gzip.compress(data))
    with pytest.raises(T.TraceFormatError, match=r"refused to unpickle: the pickle names the global 'posix\.system'"):
        T.load(p)
    assert not (tmp_path / "pwned_by_pickle").exists()
    # ... and through the command line
    r = subprocess.run([sys.executable, "-m", "torchpool", "bench", "fragmentation", "--trace", str(p),
                        "--allocators", "torchpool", "--repeats", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "posix.system" in r.stderr and str(p) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "pwned_by_pickle").exists()


def _pt_snapshot_like():
    """What torch.cuda.memory._snapshot() returns (the keys and value types of torch 2.x), built by hand:
    there is no GPU here."""
    frames = [{"filename": "/x/train.py", "line": 10, "name": "step"}]
    seg = {"device": 0, "address": 1 << 32, "total_size": 2 << 20, "allocated_size": 512, "active_size": 512,
           "requested_size": 500, "stream": 0, "segment_type": "small", "segment_pool_id": (0, 0),
           "is_expandable": False, "frames": frames,
           "blocks": [{"address": 1 << 32, "size": 512, "requested_size": 500, "state": "active_allocated",
                       "frames": frames}]}
    tr = [{"action": "segment_alloc", "addr": 1 << 32, "size": 2 << 20, "stream": 0, "time_us": 100, "frames": frames},
          {"action": "alloc", "addr": 1 << 32, "size": 512, "stream": 0, "time_us": 101, "frames": frames},
          {"action": "alloc", "addr": (1 << 32) + 512, "size": 1024, "stream": 0, "time_us": 102, "frames": frames},
          {"action": "free_requested", "addr": (1 << 32) + 512, "size": 1024, "stream": 0, "time_us": 103, "frames": []},
          {"action": "free_completed", "addr": (1 << 32) + 512, "size": 1024, "stream": 0, "time_us": 104, "frames": []},
          {"action": "oom", "addr": 0, "size": 1 << 34, "stream": 0, "time_us": 105, "frames": frames,
           "device_free": 100}]
    return {"segments": [seg], "device_traces": [tr], "allocator_settings": {"PYTORCH_CUDA_ALLOC_CONF": None,
            "expandable_segments": False, "roundup_power2_divisions": {1: 0}}}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_real_snapshot_shapes_load_with_the_restricted_unpickler(tmp_path, protocol):
    snap = _pt_snapshot_like()
    snap["seen"] = {1, 2}  # protocol 2 spells sets as builtins.set, bytes as _codecs.encode
    snap["raw"] = b"\x00\xff"
    p = tmp_path / "snap.pickle"
    with open(p, "wb") as f:
        pickle.dump(snap, f, protocol=protocol)  # what torch.cuda.memory._dump_snapshot does
    t = T.load(p)
    assert list(t.records["op"]) == [2, 0, 0, 1, 4]
    assert t.records["size"][4] == 1 << 34 and t.records["time_ns"][4] == 5000
    assert T.safe_unpickle(p, p.read_bytes()) == snap


def test_torchpool_dump_snapshot_round_trips(python_subprocess, tmp_path):
    code = f"""
import torch, torchpool
from torchpool.tracing import trace as T
torchpool.install()
with torchpool.record_trace({str(tmp_path / 'r.tptrace.gz')!r}):
    x = torch.ones(1000, 100); y = x * 2; del x
torchpool.dump_snapshot({str(tmp_path / 's.pickle')!r}, trace={str(tmp_path / 'r.tptrace.gz')!r})
t = T.load({str(tmp_path / 's.pickle')!r})
n = T.load({str(tmp_path / 'r.tptrace.gz')!r})
assert t.count("alloc") == n.count("alloc") >= 2, (t.count("alloc"), n.count("alloc"))
assert (t.records["size"][t.records["op"] == 0] == n.records["requested"][n.records["op"] == 0]).all()
print("ok")
"""
    r = python_subprocess(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_codecs_encode_only_with_latin1(tmp_path):
    # protocol 2 writes bytes as _codecs.encode(str, "latin1"); another codec is refused
    data = b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(T.TraceFormatError, match="_codecs.encode with encoding 'rot13'"):
        T.loads(data)


# ---- limits (item 7) -----------------------------------------------------------------------------

def test_gzip_bomb_stops_at_max_bytes_with_how_to_raise(tmp_path):
    p = tmp_path / "bomb.tptrace.gz"
    p.write_bytes(H.gzip_bomb(64 << 20))
    assert p.stat().st_size < 100_000
    with pytest.raises(T.TraceLimitError, match=r"exceeds the limit max_bytes=1048576.*TraceLimits\(max_bytes=N\)"
                       r".*--max-trace-bytes N") as e:
        T.load(p, limits=T.TraceLimits(max_bytes=1 << 20))
    assert str(p) in str(e.value)
    # raised, the same file is read (and is then just not a trace)
    with pytest.raises(T.TraceFormatError, match="unknown trace format"):
        T.load(p, limits=T.TraceLimits(max_bytes=128 << 20))
    r = subprocess.run([sys.executable, "-m", "torchpool", "bench", "fragmentation", "--trace", str(p),
                        "--allocators", "torchpool", "--max-trace-bytes", "1M"], capture_output=True, text=True)
    assert r.returncode == 2 and "max_bytes=1048576" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_default_limit_bounds_a_bomb_in_memory(python_subprocess, tmp_path):
    # 1.25 GiB of zeros in ~1.2 MB of gzip: refused at the default 1 GiB, RSS stays near that.
    p = tmp_path / "bomb.gz"
    p.write_bytes(H.gzip_bomb(1280 << 20))
    code = f"""
import resource
from torchpool.tracing import trace as T
try:
    T.load({str(p)!r})
except T.TraceLimitError as e:
    assert "max_bytes=1073741824" in str(e), e
    print("peak_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
    r = python_subprocess(code)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split()[-1])
    assert peak < 2600, peak  # the 1 GiB of output kept plus its join, not unbounded


def test_event_header_and_pickle_limits(tmp_path):
    small = T.TraceLimits(max_events=10, max_header_bytes=1000, max_pickle_bytes=2000)
    rows = [f"1,14:21:19.{i:06d},allocate,0x{0x1000 * (i + 1):x},256,0x0" for i in range(11)]
    cases = {
        "rmm": (H.rmm(*rows), "max_events=10"),
        "native": (H.native([H.record(0, addr=0x1000 * (i + 1)) for i in range(11)]), "max_events=10"),
        "snapshot": (H.snapshot([H.ev(addr=4096 * (i + 1)) for i in range(11)]), "max_events=10|max_pickle_bytes"),
        "header": (H.native([], {"meta": {"x": "y" * 2000}}), "max_header_bytes=1000"),
        "pickle": (H.snapshot([H.ev(addr=4096 * (i + 1)) for i in range(5)], junk="z" * 3000), "max_pickle_bytes=2000"),
    }
    for name, (data, msg) in cases.items():
        with pytest.raises(T.TraceLimitError, match=msg):
            T.loads(data, limits=small)
        T.loads(data)  # within the defaults: loads
    with pytest.raises(ValueError, match="max_events must be an int >= 0"):
        T.TraceLimits(max_events=-1)


def test_replay_limit_for_system_allocators(tmp_path):
    t = T.loads(H.replay_cases()["replay_glibc_3gib"])
    with pytest.raises(T.TraceLimitError, match=r"glibc would write 3221225472 bytes.*max_replay_bytes=2147483648"
                       r".*--max-replay-bytes N"):
        R.replay(t, ["torchpool", "glibc"], repeats=1)
    # fake-address allocators write nothing: no limit
    rows = R.replay(t, ["torchpool", "pytorch"], repeats=1)
    assert all(r["peak_live_bytes"] == 3 << 30 for r in rows)
    # the C++ engine refuses too, whoever calls it
    rt = R.compile_trace(t)
    from torchpool._build import _C

    with pytest.raises(_C.ReplayLimitError, match="max_replay_bytes"):
        rt.measure("glibc")
    with pytest.raises(_C.ReplayLimitError):
        rt.time("glibc", max_system_bytes=1 << 20)
    # raised, a small trace runs against glibc
    small = T.loads(H.native([H.record(0, addr=0x1000, size=4 << 20), H.record(1, addr=0x1000, size=4 << 20)]))
    with pytest.raises(T.TraceLimitError):
        R.replay(small, ["glibc"], repeats=1, max_replay_bytes=1 << 20)
    [row] = R.replay(small, ["glibc"], repeats=1, max_replay_bytes=8 << 20)
    assert row["peak_live_bytes"] == 4 << 20


def test_replay_limit_from_the_command_line(tmp_path):
    p = tmp_path / "big.tptrace"
    p.write_bytes(H.replay_cases()["replay_glibc_3gib"])
    r = subprocess.run([sys.executable, "-m", "torchpool", "bench", "fragmentation", "--trace", str(p),
                        "--allocators", "glibc", "--repeats", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "max_replay_bytes=2147483648" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "torchpool", "bench", "fragmentation", "--trace", str(p),
                        "--allocators", "glibc", "--repeats", "1", "--max-replay-bytes", "1G"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "max_replay_bytes=1073741824" in r.stderr, r.stderr


# ---- the replay's own bounds (item 5) -----------------------------------------------------------

def test_replay_compile_checks_every_size():
    from torchpool._build import _C

    for size in ((1 << 64) - 100, 1 << 62, (1 << 40) + 1):
        raw = H.record(0, size=size) + H.record(1, size=size)
        with pytest.raises(_C.ReplayInputError, match=rf"record 0: field 'requested' is {size}"):
            _C.ReplayTrace(raw)
        # a Trace built in memory (no importer checks) is refused with the trace named
        t = T.Trace(np.frombuffer(raw, dtype=T.RECORD).copy(), {"name": "crafted"})
        with pytest.raises(T.TraceFormatError, match=r"crafted: cannot replay: record 0"):
            R.replay(t, ["torchpool"], repeats=1)
    with pytest.raises(T.TraceFormatError, match=r"record 4: field 'size' is 1099511627776: live bytes would exceed"):
        R.compile_trace(T.loads(H.replay_cases()["replay_live_over_bound"]))
    with pytest.raises(T.TraceFormatError, match=r"record 65536: field 'stream' is 65536: more than 65536 distinct"):
        R.compile_trace(T.loads(H.replay_cases()["replay_many_streams"]))
    # the largest admitted block replays with exact numbers on every fake-address allocator
    t = T.loads(H.native([H.record(0, size=1 << 40), H.record(0, addr=0x20000, size=4096),
                          H.record(1, size=1 << 40)]))
    for row in R.replay(t, ["torchpool", "torchpool-segments", "pytorch", "pytorch-expandable"], repeats=1):
        assert row["peak_live_bytes"] == (1 << 40) + 4096, row
        assert 0 < row["utilization"] <= 1, row


def test_bench_cli_hostile_files_exit_2_without_traceback(tmp_path):
    for name in ("native_size_2_64_minus_100", "snapshot_size_minus_1", "rmm_size_2_64_minus_1",
                 "native_header_deep_json", "native_meta_list"):
        p = tmp_path / name
        p.write_bytes(CASES[name][0])
        r = subprocess.run([sys.executable, "-m", "torchpool", "bench", "fragmentation", "--trace", str(p),
                            "--allocators", "torchpool", "--repeats", "1"], capture_output=True, text=True)
        assert r.returncode == 2, (name, r.stderr)
        assert "Traceback" not in r.stderr and str(p) in r.stderr, (name, r.stderr)


def test_memo_index_does_not_allocate(python_subprocess):
    # fuzz_trace.py's first finding: LONG_BINPUT 808215909 made the C unpickler allocate 12 GiB
    code = """
import resource, sys
sys.path.insert(0, %r)
import hostile_traces as H
from torchpool.tracing import trace as T
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name in ("snapshot_memo_index", "snapshot_binbytes8_huge", "snapshot_bytearray8_huge"):
    try:
        T.loads(H.cases()[name][0])
    except T.TraceFormatError:
        pass
print("grew_mib", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""" % str(Path(__file__).parent / "fuzz")
    r = python_subprocess(code)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 200, r.stdout
