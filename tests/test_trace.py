"""Trace files: recording from the real allocator, the file format, and the importers' errors."""

import gzip
import json
import pickle
import textwrap

import numpy as np
import pytest

from torchpool.tracing import trace as T


def _synthetic(n_steps=5):
    rows = []
    addr = 0x10000
    for step in range(n_steps):
        live = []
        for k in range(4):
            rows.append((step * 100 + k, addr, 4096, 1000 + k, 0, -1, T.OPS["alloc"]))
            live.append(addr)
            addr += 1 << 20
        for a in live:
            rows.append((step * 100 + 50, a, 4096, 1000, 0, -1, T.OPS["free"]))
    rec = T.make_records(len(rows))
    for i, name in enumerate(("time_ns", "addr", "size", "requested", "stream", "device", "op")):
        rec[name] = [r[i] for r in rows]
    return T.Trace(rec, {"name": "synthetic"})


def test_record_trace_context_manager_and_start_stop(python_subprocess, tmp_path):
    code = textwrap.dedent(f"""
        import torch, torchpool
        from torchpool.tracing import trace as T
        torchpool.install()
        with torchpool.record_trace({str(tmp_path / 'a.tptrace.gz')!r}) as rec:
            x = torch.ones(1000, 100)
            y = (x * 2).sum()
            del x
        t = T.load({str(tmp_path / 'a.tptrace.gz')!r})
        assert t.count("alloc") >= 2 and t.count("free") >= 1, (t.count("alloc"), t.count("free"))
        r = t.records
        allocs = r[r["op"] == 0]
        assert (allocs["requested"] <= allocs["size"]).all()
        assert (allocs["requested"] == 400000).any()   # the 1000 x 100 float tensor
        assert (np.diff(r["time_ns"].astype(np.int64)) >= 0).all()
        assert t.header["version"] == 1 and t.header["dropped"] == 0 and t.header["device"] == "cpu"
        rec2 = torchpool.record_trace({str(tmp_path / 'b.tptrace.gz')!r})
        rec2.start()
        z = torch.zeros(50000)
        del z
        tr = rec2.stop()
        assert tr.count("alloc") >= 1 and tr.count("free") >= 1
        assert len(T.load({str(tmp_path / 'b.tptrace.gz')!r})) == len(tr)
        print("ok")
    """).replace("import torch, torchpool", "import numpy as np, torch, torchpool")
    r = python_subprocess(code)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_record_trace_with_python_stacks_names_this_code(python_subprocess, tmp_path):
    path = tmp_path / "s.tptrace.gz"
    code = textwrap.dedent(f"""
        import torch, torchpool
        from torchpool.tracing import trace as T
        torchpool.install()
        def make_big():
            return torch.ones(300, 300) + 1
        with torchpool.record_trace({str(path)!r}, stacks=True):
            y = make_big()
        t = T.load({str(path)!r})
        stacks = [t.header["stacks"][s] for _, s in t.header["event_stacks"]]
        assert any(any("make_big" in f for f in st) for st in stacks), t.header["stacks"]
        print("ok")
    """)
    r = python_subprocess(code)
    assert r.returncode == 0, r.stderr


def test_record_trace_requires_an_installed_allocator(python_subprocess, tmp_path):
    r = python_subprocess(f"import torchpool\ntorchpool.record_trace({str(tmp_path / 'x')!r}).start()")
    assert r.returncode != 0
    assert "not installed" in r.stderr


def test_save_load_round_trip(tmp_path):
    t = _synthetic()
    T.save(t, tmp_path / "x.tptrace.gz")
    u = T.load(tmp_path / "x.tptrace.gz")
    assert np.array_equal(u.records, t.records)
    assert u.header["records"] == len(t) and u.name == "synthetic"
    assert u.live_bytes().max() == 4006


def _write_native(path, header, body):
    with gzip.open(path, "wb") as f:
        f.write(T.MAGIC + json.dumps(header).encode() + b"\n" + body)


@pytest.mark.parametrize("case, message", [
    ("truncated", "truncated or corrupt"),
    ("bad_json", "not JSON"),
    ("version", "version 99"),
    ("bad_op", "record 1 has unknown op 9"),
    ("garbage", "unknown trace format"),
    ("broken_gzip", "broken gzip"),
    ("missing", "cannot read"),
])
def test_broken_files_get_clear_errors(tmp_path, case, message):
    p = tmp_path / f"{case}.tptrace.gz"
    t = _synthetic(1)
    body = t.to_bytes()
    hdr = {"format": "torchpool-trace", "version": 1, "records": len(t), "record_bytes": 48}
    if case == "truncated":
        _write_native(p, hdr, body[:-10])
    elif case == "bad_json":
        with gzip.open(p, "wb") as f:
            f.write(T.MAGIC + b"{not json\n" + body)
    elif case == "version":
        _write_native(p, {**hdr, "version": 99}, body)
    elif case == "bad_op":
        rec = t.records.copy()
        rec["op"][1] = 9
        _write_native(p, hdr, rec.tobytes())
    elif case == "garbage":
        p.write_bytes(b"hello world, not a trace")
    elif case == "broken_gzip":
        p.write_bytes(gzip.compress(b"x" * 1000)[:20])
    with pytest.raises(T.TraceFormatError, match=message) as e:
        T.load(p)
    assert str(p) in str(e.value)


RMM_LOG = """Thread,Time,Action,Pointer,Size,Stream
140573312345856,1634567890.100000,allocate,0x7f8a40000000,1024,0x7f8a38001020
140573312345856,1634567890.200000,allocate,0x7f8a40000400,2048,0x7f8a38001020
140573312345856,1634567890.300000,free,0x7f8a40000000,1024,0x7f8a38001020
140573312345856,1634567890.400000,allocate failure,0x0,1099511627776,0x7f8a38001020
140573312345856,1634567890.500000,deallocate,0x7f8a40000400,2048,0x7f8a38001020
"""


def test_import_rmm_csv(tmp_path):
    p = tmp_path / "rmm_log.csv"
    p.write_text(RMM_LOG)
    t = T.load(p)
    assert list(t.records["op"]) == [0, 0, 1, 4, 1]
    assert t.records["addr"][0] == 0x7F8A40000000 and t.records["size"][1] == 2048
    assert t.records["stream"][0] == 0x7F8A38001020
    assert abs(int(t.records["time_ns"][2]) - 200_000_000) < 1000  # float seconds since epoch
    assert t.live_bytes().max() == 3072


def test_rmm_csv_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text(RMM_LOG.replace("deallocate", "explode"))
    with pytest.raises(T.TraceFormatError, match=r"bad.csv:6: unknown Action 'explode'"):
        T.load(p)
    p.write_text("Thread,Time,Action,Pointer\n1,2,allocate,0x1\n")
    with pytest.raises(T.TraceFormatError, match="lacks column"):
        T.load(p)
    p.write_text(RMM_LOG.replace("0x7f8a40000400,2048", "0x7f8a40000400,lots"))
    with pytest.raises(T.TraceFormatError, match=r"bad.csv:3: cannot parse"):
        T.load(p)


def _snapshot(events):
    return {"segments": [], "device_traces": [events]}


def test_import_pytorch_snapshot(tmp_path):
    ev = [
        {"action": "segment_alloc", "addr": 1 << 30, "size": 2 << 20, "stream": 0, "time_us": 10},
        {"action": "alloc", "addr": 1 << 30, "size": 512, "stream": 0, "time_us": 11, "frames": []},
        {"action": "alloc", "addr": (1 << 30) + 512, "size": 1024, "stream": 0, "time_us": 12, "frames": []},
        {"action": "free_requested", "addr": 1 << 30, "size": 512, "stream": 0, "time_us": 13},
        {"action": "free_completed", "addr": 1 << 30, "size": 512, "stream": 0, "time_us": 14},
        {"action": "snapshot", "addr": 0, "size": 0, "stream": 0, "time_us": 15},
    ]
    p = tmp_path / "snap.pickle"
    p.write_bytes(pickle.dumps(_snapshot(ev)))
    t = T.load(p)
    assert list(t.records["op"]) == [2, 0, 0, 1]  # free_requested and snapshot are not replayed
    assert t.records["time_ns"][3] == 4000
    assert t.header["device"] == "cuda:0"
    # Without free_completed events, free_requested is the free.
    p.write_bytes(pickle.dumps(_snapshot([e for e in ev if e["action"] != "free_completed"])))
    assert list(T.load(p).records["op"]) == [2, 0, 0, 1]


def test_pytorch_snapshot_errors(tmp_path):
    p = tmp_path / "x.pickle"
    p.write_bytes(pickle.dumps({"hello": 1}))
    with pytest.raises(T.TraceFormatError, match="not a PyTorch memory snapshot"):
        T.load(p)
    p.write_bytes(pickle.dumps(_snapshot([{"action": "teleport", "addr": 0, "size": 1}])))
    with pytest.raises(T.TraceFormatError, match=r"device_traces\[0\]\[0\]: unknown action 'teleport'"):
        T.load(p)
    p.write_bytes(b"\x80\x04broken pickle")
    with pytest.raises(T.TraceFormatError, match="not a readable pickle"):
        T.load(p)


# What RMM's logging_resource_adaptor writes (rmm/mr/detail/logging_resource_adaptor_impl.cpp): the
# header line alone, then the pattern "%t,%H:%M:%S.%f,%v" (thread id, wall-clock time of day with
# microseconds) around "allocate,%p,%zu,%s", "free,%p,%zu,%s" and "allocate failure,%p,%zu,%s" with a
# null pointer, which glibc's %p prints as (nil).  Two threads, streams 0x2 and 0, past midnight.
RMM_REAL_LOG = """Thread,Time,Action,Pointer,Size,Stream
1979932,23:59:59.998533,allocate,0x30a000000,256,0x2
1979932,23:59:59.999001,allocate,0x30a000200,1048576,0x2
1980043,23:59:59.999870,allocate failure,(nil),85899345920,0x2
1979932,00:00:00.000120,free,0x30a000000,256,0x2
1980043,00:00:00.661875,allocate,0x30a100200,4096,0
1980043,00:00:01.000000,free,0x30a000200,1048576,0x2
1980043,00:00:01.500000,free,0x30a100200,4096,0
"""


def test_import_rmm_log_as_rmm_writes_it(tmp_path):
    p = tmp_path / "rmm_log.csv"
    p.write_text(RMM_REAL_LOG)
    t = T.load(p)
    assert list(t.records["op"]) == [0, 0, 4, 1, 0, 1, 1]
    assert t.records["addr"][0] == 0x30A000000 and t.records["size"][2] == 85899345920
    assert list(t.records["stream"]) == [2, 2, 2, 2, 0, 2, 0]
    # microseconds since the first event, across midnight
    assert list(t.records["time_ns"]) == [0, 468_000, 1_337_000, 1_587_000, 663_342_000, 1_001_467_000, 1_501_467_000]
    assert list(t.live_bytes()) == [256, 1048832, 1048832, 1048576, 1052672, 4096, 0]
    from torchpool.tracing import replay as R

    [row] = R.replay(t, ["pytorch"], repeats=1)
    assert row["peak_live_bytes"] == 1048576 + 4096 and row["_extra"]["ops"] == 6
    # the older HH:MM:SS:microseconds spelling reads the same
    p.write_text(RMM_REAL_LOG.replace("23:59:59.998533", "23:59:59:998533"))
    assert T.load(p).records["time_ns"][1] == 468_000
