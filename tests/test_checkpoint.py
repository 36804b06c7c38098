"""The safetensors reader: differential against the safetensors package, sharded layouts, zero-copy
views and their lifetime, the two read paths, slices."""

from __future__ import annotations

import gc
import json
import os

import pytest
import torch

import torchpool
from checkpoint_gen import ST_DTYPES, llama_like, tensor_bytes, write_file, write_sharded

safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

# dtypes the safetensors package can write with torch
REF_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.uint16, torch.uint32, torch.uint64, torch.complex64,
              torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
ODD_SHAPES = [(), (0,), (1,), (3,), (7, 0), (5, 3), (1, 1, 1), (2, 3, 5), (13, 1), (17, 9)]


def _rand(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * torch.empty((), dtype=dtype).element_size(),), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


def _same_bytes(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
    assert tensor_bytes(a) == tensor_bytes(b)


@pytest.fixture
def every_dtype_file(tmp_path):
    tensors = {}
    for i, dt in enumerate(REF_DTYPES):
        for j, shape in enumerate(ODD_SHAPES):
            tensors[f"{ST_DTYPES[dt]}.{j}"] = _rand(dt, shape, i * 100 + j)
    path = tmp_path / "all.safetensors"
    safetensors_torch.save_file(tensors, str(path), metadata={"k": "v"})
    return path, tensors


def test_every_dtype_matches_safetensors(every_dtype_file):
    path, tensors = every_dtype_file
    ref = safetensors_torch.load_file(str(path))
    with torchpool.open_checkpoint(path) as ck:
        assert set(ck.keys()) == set(ref) and len(ck) == len(ref)
        assert ck.metadata == {"k": "v"}
        for name in ref:
            _same_bytes(ck[name], ref[name])
            _same_bytes(ref[name], tensors[name])
        for mode in ("mmap", "read", "direct"):
            got = ck.load(mode=mode)
            assert ck.stats()["last_load_path"] == mode
            for name in ref:
                _same_bytes(got[name], ref[name])


def test_float8_e8m0_and_float4_written_by_generator(tmp_path):
    e8 = torch.randint(0, 255, (5, 3), dtype=torch.uint8).view(torch.float8_e8m0fnu)
    f4 = torch.randint(0, 256, (4, 3), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    path = write_file(tmp_path / "f.safetensors", {"e8": e8, "f4": f4})
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert header["f4"]["shape"] == [4, 6] and header["f4"]["dtype"] == "F4"
    with torchpool.open_checkpoint(path) as ck:
        _same_bytes(ck["e8"], e8)
        _same_bytes(ck["f4"], f4)
        assert ck.info("f4").shape == (4, 6) and ck.info("f4").torch_shape == (4, 3)
        _same_bytes(ck.load(mode="read")["f4"], f4)
        _same_bytes(ck.get_slice("f4")[1:3], f4[1:3])


def test_slices_match_safetensors(tmp_path):
    t = _rand(torch.float32, (37, 23), 1)
    t3 = _rand(torch.bfloat16, (6, 5, 7), 2)
    path = tmp_path / "s.safetensors"
    safetensors_torch.save_file({"t": t, "t3": t3}, str(path))
    keys = [(slice(None),), (slice(3, 19),), (slice(None), slice(5, 17)), (slice(2, 30, 3), slice(1, 22, 4)),
            (4,), (-1, slice(2, 9)), (slice(10, 10),), (Ellipsis, 3), (slice(0, 37), slice(0, 23)),
            (slice(-5, None), slice(None, -3))]
    keys3 = [(1, 2), (slice(1, 4), 0, slice(2, 6)), (Ellipsis, slice(1, 3)), (slice(None), slice(1, 4)), (5, 4, 6)]
    with safe_open(str(path), framework="pt") as ref, torchpool.open_checkpoint(path) as ck:
        for name, ks in (("t", keys), ("t3", keys3)):
            rs, ms = ref.get_slice(name), ck.get_slice(name)
            assert ms.get_shape() == rs.get_shape()
            for k in ks:
                want = ref.get_tensor(name)[k]
                _same_bytes(ms[k].contiguous(), want.contiguous())
                if all(not isinstance(x, slice) or x.step in (None, 1) for x in k) and Ellipsis not in k:
                    _same_bytes(ms[k].contiguous(), rs[k].contiguous())


def test_slice_reads_only_its_bytes(tmp_path):
    t = torch.arange(64 * 128, dtype=torch.float32).reshape(64, 128)
    path = write_file(tmp_path / "w.safetensors", {"w": t, "w2": t * 2})
    with torchpool.open_checkpoint(path) as ck:
        ck.reset_stats()
        rows = ck.get_slice("w")[:32]
        assert ck.stats()["bytes_read"] == t.nbytes // 2
        assert torch.equal(rows, t[:32])
        ck.reset_stats()
        cols = ck.get_slice("w")[:, 64:]
        assert ck.stats()["bytes_read"] == t.nbytes // 2
        assert torch.equal(cols, t[:, 64:])
        ck.reset_stats()
        both = ck.load_slices({"w": (slice(None), slice(64, None)), "w2": (slice(0, 8), 3)})
        assert torch.equal(both["w"], t[:, 64:]) and torch.equal(both["w2"], (t * 2)[0:8, 3])
        assert ck.stats()["bytes_read"] == t.nbytes // 2 + 8 * 4


def test_zero_copy_and_lifetime(tmp_path):
    t = torch.arange(4096, dtype=torch.float32)
    path = write_file(tmp_path / "z.safetensors", {"a": t, "b": t * 2})
    ck = torchpool.open_checkpoint(path)
    a = ck["a"]
    base = ck.shards[0].address
    assert base <= a.data_ptr() < base + ck.shards[0].file_size  # a view of the mapping
    assert ck.stats()["bytes_read"] == 0  # nothing was read with pread
    ck.close()
    assert ck.closed
    with pytest.raises(torchpool.CheckpointError, match="closed"):
        ck["b"]
    del ck
    gc.collect()
    assert torch.equal(a, t)  # the mapping outlives the checkpoint object


def test_writes_never_reach_the_file(tmp_path):
    t = torch.arange(1024, dtype=torch.float32)
    path = write_file(tmp_path / "w.safetensors", {"a": t})
    before = path.read_bytes()
    with torchpool.open_checkpoint(path) as ck:
        a = ck["a"]
        a.add_(1)  # copy-on-write: the process keeps running, the tensor changes
        assert torch.equal(a, t + 1)
        assert torch.equal(torchpool.open_checkpoint(path)["a"], t)
    assert path.read_bytes() == before


def test_sharded_layouts(tmp_path):
    sd = llama_like(layers=3, hidden=32, inter=48, vocab=64, dtype=torch.bfloat16)
    idx = write_sharded(tmp_path / "ck", sd, 3)
    plain = write_sharded(tmp_path / "plain", sd, 2, index=False)
    for p in (idx, idx.parent, plain):
        with torchpool.open_checkpoint(p) as ck:
            assert ck.keys() == list(sd) if p != plain else set(ck.keys()) == set(sd)
            assert len(ck.shard_paths) == (3 if p != plain else 2)
            for name, t in sd.items():
                _same_bytes(ck[name], t)
            got = ck.load(mode="read")
            for name, t in sd.items():
                _same_bytes(got[name], t)
            assert ck.metadata["format"] == "pt"


def test_index_resolves_through_weight_map_not_file_names(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    write_file(d / "zzz.safetensors", {"a": torch.ones(3)})
    write_file(d / "aaa.safetensors", {"b": torch.zeros(2), "stale": torch.ones(1)})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"b": "aaa.safetensors", "a": "zzz.safetensors"}}))
    with torchpool.open_checkpoint(d) as ck:
        assert ck.keys() == ["b", "a"] and "stale" not in ck
        assert torch.equal(ck["a"], torch.ones(3))


def test_load_dtype_and_names(tmp_path):
    sd = {"a": torch.randn(10, 3), "b": torch.randn(4)}
    path = write_file(tmp_path / "x.safetensors", sd)
    with torchpool.open_checkpoint(path) as ck:
        got = ck.load(["b"], dtype=torch.float64, mode="read")
        assert list(got) == ["b"] and got["b"].dtype == torch.float64
        assert torch.equal(got["b"], sd["b"].double())
        with pytest.raises(KeyError):
            ck.load(["nope"])


def _evict(path) -> bool:
    """Drops the file's clean pages from the page cache; False where the filesystem keeps them (tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    with torchpool.open_checkpoint(path) as ck:
        return ck.resident_fraction() < 0.5


def test_cold_cpu_paths(tmp_path):
    # Note [Cold mapping]: a cold CPU load maps (reads ahead, then populates) by default; the staged
    # pipeline and the direct pread stay available and give the same bytes.
    sd = {f"t{i}": torch.randn(300_000 + i) for i in range(5)}  # 1.2 MB each, several 64 KiB pieces
    sd["z"] = torch.empty(0)
    path = write_file(tmp_path / "cold.safetensors", sd)
    total = sum(v.nbytes for v in sd.values())
    for cold_path in ("mmap", "read", "direct"):
        if not _evict(path):
            pytest.skip("the page cache of this filesystem cannot be dropped")
        with torchpool.open_checkpoint(path, cold_cpu_path=cold_path, chunk_bytes=64 << 10, readers=3) as ck:
            assert ck.resident_fraction() < 0.9
            got = ck.load()
            st = ck.stats()
            assert st["last_load_path"] == cold_path
            for k, v in sd.items():
                _same_bytes(got[k], v)
            if cold_path == "mmap":
                assert st["bytes_read"] == 0 and st["staging"] is None and st["mapped_view_bytes"] == total
                assert ck.resident_fraction() == 1.0  # resident when load returns
            elif cold_path == "read":
                assert st["bytes_read"] == total and st["staging"]["bytes_staged"] == total
            else:
                assert st["bytes_read"] == total and st["staging"] is None
        del got  # mapped views keep their pages in the page cache
        gc.collect()
    with pytest.raises(ValueError, match="cold_cpu_path"):
        torchpool.open_checkpoint(path, cold_cpu_path="nope")


def test_staging_pipeline_stats_and_reuse(tmp_path):
    # more data than the staging pool: buffers must be reused, never allocated per tensor
    sd = {f"t{i}": torch.full((70_000,), float(i)) for i in range(12)}  # 280 KB each
    path = write_file(tmp_path / "s.safetensors", sd)
    with torchpool.open_checkpoint(path, staging_bytes=256 << 10, chunk_bytes=64 << 10, readers=3) as ck:
        got = ck.load(mode="read")
        st = ck.stats()["staging"]
        assert all(torch.equal(got[k], v) for k, v in sd.items())
        total = sum(v.nbytes for v in sd.values())
        assert st["bytes_staged"] == total and ck.stats()["bytes_read"] == total
        assert st["buffers"] <= st["max_buffers"] == 4 and st["buffer_bytes"] <= 256 << 10
        assert st["reuses"] == st["chunks"] - st["buffers"] > 0
        ck.load(mode="read")
        st2 = ck.stats()["staging"]
        # a second load reuses the buffers: new ones only up to the cap (when the first load needed fewer)
        assert st2["buffers"] <= 4 and st2["reuses"] >= st["reuses"] + st2["chunks"] - st["chunks"] - (4 - st["buffers"])


def test_staging_buffers_are_made_when_needed(tmp_path):
    # buffers are mapped lazily, by the reader that needs one: a one-chunk load maps one buffer, a
    # larger load grows the pool up to its cap and later loads reuse what is there
    sd = {"small": torch.arange(1000, dtype=torch.int32), "big": torch.randn(200_000)}  # 4 KB, 800 KB
    path = write_file(tmp_path / "g.safetensors", sd)
    with torchpool.open_checkpoint(path, staging_bytes=256 << 10, chunk_bytes=64 << 10, readers=4) as ck:
        assert ck.stats()["staging"] is None
        assert torch.equal(ck.load(["small"], mode="read")["small"], sd["small"])
        st = ck.stats()["staging"]
        assert st["buffers"] == 1 and st["chunks"] == 1 and st["reuses"] == 0 and st["bytes_staged"] == 4000
        assert torch.equal(ck.load(["big"], mode="read")["big"], sd["big"])
        st = ck.stats()["staging"]
        assert 1 <= st["buffers"] <= st["max_buffers"] == 4 and st["buffer_bytes"] == st["buffers"] * (64 << 10)
        assert st["chunks"] == 1 + -(-800_000 // (64 << 10)) and st["reuses"] == st["chunks"] - st["buffers"]
        assert st["bytes_staged"] == 804_000 == ck.stats()["bytes_read"]
        assert st["mapped_bytes"] == st["buffer_bytes"]


def test_staged_consumer_path(tmp_path):
    # the path a device copy takes: a consumer receives each staged chunk
    sd = {"a": torch.randn(100_000), "b": torch.arange(7, dtype=torch.int16), "z": torch.empty(0)}
    path = write_file(tmp_path / "c.safetensors", sd)
    with torchpool.open_checkpoint(path, staging_bytes=128 << 10, chunk_bytes=32 << 10) as ck:
        infos = [ck.info(n) for n in ("a", "b")]
        dst = [torch.zeros(i.nbytes, dtype=torch.uint8) for i in infos]
        ops = [(ck.shards[0], i.offset, i.nbytes, 0, i.name) for i in infos]

        def consume(k, off, mv):
            src = torch.frombuffer(mv, dtype=torch.uint8)
            dst[k][off:off + src.numel()].copy_(src)

        ck.staging_pool().read_with(ops, 2, consume)
        assert torch.equal(dst[0].view(torch.float32), sd["a"])
        assert torch.equal(dst[1].view(torch.int16), sd["b"])

        def boom(k, off, mv):
            raise RuntimeError("consumer failed")

        with pytest.raises(RuntimeError, match="consumer failed"):
            ck.staging_pool().read_with(ops, 2, boom)
        assert torch.equal(ck.load(mode="read")["a"], sd["a"])  # the pool still works


def test_staging_without_mlock_says_so(tmp_path):
    path = write_file(tmp_path / "s.safetensors", {"a": torch.randn(1000)})
    pool = torchpool._C.StagingPool(1 << 20, 1 << 18, "host_pinned", False)
    ck = torchpool.open_checkpoint(path)
    i = ck.info("a")
    out = torch.empty(1000)
    pool.read([(ck.shards[0], i.offset, i.nbytes, out.data_ptr(), "a")], 2)
    st = pool.stats()
    assert st["pinned"] is False and st["locked_bytes"] == 0 and st["mapped_bytes"] > 0
    assert torch.equal(out, ck["a"])


def test_mlock_refused_falls_back(tmp_path, python_subprocess):
    # An unprivileged process may lock only RLIMIT_MEMLOCK bytes: set the limit to 0 and, as root,
    # also drop CAP_IPC_LOCK (which ignores the limit) with capset(2).
    code = """
import ctypes, os, resource
resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    class Hdr(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    hdr, data = Hdr(0x20080522, 0), (Data * 2)()
    assert libc.capget(ctypes.byref(hdr), data) == 0
    data[0].effective &= ~(1 << 14); data[0].permitted &= ~(1 << 14)  # CAP_IPC_LOCK
    assert libc.capset(ctypes.byref(hdr), data) == 0, ctypes.get_errno()
import torch, torchpool
pool = torchpool._C.StagingPool(1 << 20, 1 << 18)
ck = torchpool.open_checkpoint(os.environ['CK'])
i = ck.info('a'); out = torch.empty(1000)
pool.read([(ck.shards[0], i.offset, i.nbytes, out.data_ptr(), 'a')], 2)
st = pool.stats()
assert torch.equal(out, ck['a'])
print(st['pinned'], st['lock_failures'], st['locked_bytes'], st['mapped_bytes'], st['lock_errno'])
"""
    path = write_file(tmp_path / "s.safetensors", {"a": torch.randn(1000)})
    r = python_subprocess(code, env={"CK": str(path)})
    assert r.returncode == 0, r.stderr
    pinned, failures, locked, mapped, err = r.stdout.split()
    assert pinned == "False" and int(failures) > 0 and int(locked) == 0 and int(mapped) > 0 and int(err) > 0


def test_auto_path_is_mmap_when_warm(tmp_path):
    path = write_file(tmp_path / "w.safetensors", {"a": torch.randn(50_000)})
    path.read_bytes()  # now in the page cache
    with torchpool.open_checkpoint(path) as ck:
        assert ck.resident_fraction() > 0.9
        got = ck.load()
        assert ck.stats()["last_load_path"] == "mmap" and ck.stats()["bytes_read"] == 0
        assert torch.equal(got["a"], ck["a"])
