"""Every validation rule with its own malformed file; truncated shards; index errors; random damage
never crashes, hangs or returns garbage."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchpool
from checkpoint_gen import file_bytes, llama_like, raw_file, write_file, write_sharded

E = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# rule id -> (header (dict or raw bytes), data, length override)
CASES = {
    "file-too-small": None,  # special: 5 bytes
    "header-too-large": ({"a": E}, b"\0" * 8, 100_000_001),
    "header-past-eof": ({"a": E}, b"", 4096),
    "header-utf8": (b'{"a\xff":{}}', b"", None),
    "header-json": (b'{"a": {"dtype": "F32",', b"", None),
    "header-not-object": (b"[1, 2, 3]", b"", None),
    "duplicate-name": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                       b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8, None),
    "metadata-not-strings": ({"__metadata__": {"n": 3}, "a": E}, b"\0" * 8, None),
    "entry-fields": ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None),
    "dtype-unknown": ({"a": entry(dtype="F128")}, b"\0" * 8, None),
    "shape-invalid": ({"a": entry(shape=(2, -1))}, b"\0" * 8, None),
    "offsets-invalid": ({"a": entry(offsets=(8, 0))}, b"\0" * 8, None),
    "size-overflow": ({"a": entry(shape=(2**40, 2**40), offsets=(0, 8))}, b"\0" * 8, None),
    "size-not-whole-bytes": ({"a": entry(dtype="F4", shape=(3,), offsets=(0, 2))}, b"\0" * 2, None),
    "size-mismatch": ({"a": entry(shape=(3,), offsets=(0, 8))}, b"\0" * 8, None),
    "offsets-start": ({"a": entry(offsets=(4, 12))}, b"\0" * 12, None),
    "offsets-gap": ({"a": entry(), "b": entry(offsets=(12, 20))}, b"\0" * 20, None),
    "offsets-overlap": ({"a": entry(), "b": entry(offsets=(4, 12))}, b"\0" * 12, None),
    "data-past-eof": ({"a": entry(), "b": entry(offsets=(8, 16))}, b"\0" * 12, None),
    "data-trailing-bytes": ({"a": entry()}, b"\0" * 9, None),
}


def make(tmp_path, rule):
    path = tmp_path / f"{rule}.safetensors"
    if rule == "file-too-small":
        path.write_bytes(b"\x01\x00\x00")
        return path
    header, data, length = CASES[rule]
    return raw_file(path, header, data, length=length)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_each_rule_has_its_own_error(tmp_path, rule):
    path = make(tmp_path, rule)
    with pytest.raises(torchpool.CheckpointError) as ei:
        torchpool.open_checkpoint(path)
    err = ei.value
    assert isinstance(err, ValueError)
    assert err.rule == rule, str(err)
    assert err.file == str(path) and str(path) in str(err) and f"rule {rule}" in str(err)
    tensor_rules = {"duplicate-name", "entry-fields", "dtype-unknown", "shape-invalid", "offsets-invalid", "size-overflow",
                    "size-not-whole-bytes", "size-mismatch", "offsets-start", "offsets-gap", "offsets-overlap",
                    "data-past-eof", "data-trailing-bytes", "metadata-not-strings"}
    if rule in tensor_rules:
        assert err.tensor and f"tensor '{err.tensor}'" in str(err)
    # the same bytes through the in-memory validator give the same rule
    with pytest.raises(torchpool.CheckpointError) as e2:
        torchpool._C.validate_bytes("mem", path.read_bytes())
    assert e2.value.rule == rule


def test_the_safetensors_package_rejects_them_too(tmp_path):
    safe_open = pytest.importorskip("safetensors").safe_open
    # rules that the reference implementation also enforces (it allows some we reject, e.g. duplicates)
    for rule in ("file-too-small", "header-too-large", "header-past-eof", "header-json", "header-not-object",
                 "dtype-unknown", "size-mismatch", "offsets-gap", "offsets-overlap", "data-past-eof", "metadata-not-strings"):
        with pytest.raises(Exception):
            with safe_open(str(make(tmp_path, rule)), framework="pt") as f:
                [f.get_tensor(k) for k in f.keys()]


def test_spaces_around_the_header_are_allowed(tmp_path):
    header, data = file_bytes({"a": torch.arange(4, dtype=torch.int32)}, {"m": "x"})
    hb = b"   " + json.dumps(header).encode() + b" \n\t "
    path = raw_file(tmp_path / "sp.safetensors", hb, data)
    with torchpool.open_checkpoint(path) as ck:
        assert torch.equal(ck["a"], torch.arange(4, dtype=torch.int32)) and ck.metadata == {"m": "x"}


def test_empty_checkpoint_and_zero_sized_only(tmp_path):
    path = raw_file(tmp_path / "e.safetensors", {}, b"")
    with torchpool.open_checkpoint(path) as ck:
        assert len(ck) == 0 and ck.load() == {}
    path = raw_file(tmp_path / "z.safetensors", {"z": entry(shape=(0, 5), offsets=(0, 0))}, b"")
    with torchpool.open_checkpoint(path) as ck:
        assert ck["z"].shape == (0, 5) and ck.load(mode="read")["z"].shape == (0, 5)


def test_unsupported_dtype_is_valid_but_not_loadable(tmp_path):
    path = raw_file(tmp_path / "f6.safetensors", {"a": entry(dtype="F6_E2M3", shape=(4,), offsets=(0, 3))}, b"abc")
    with torchpool.open_checkpoint(path) as ck:
        assert "a" in ck
        with pytest.raises(torchpool.CheckpointError, match="dtype-unsupported"):
            ck["a"]


def test_truncated_shard(tmp_path):
    idx = write_sharded(tmp_path / "ck", llama_like(layers=2, hidden=32, inter=32, vocab=32), 2)
    shard = sorted(idx.parent.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(torchpool.CheckpointError) as ei:
        torchpool.open_checkpoint(idx)
    assert ei.value.rule == "data-past-eof" and ei.value.file == str(shard) and ei.value.tensor


def test_shard_truncated_after_open_reads_short(tmp_path):
    path = write_file(tmp_path / "t.safetensors", {"a": torch.randn(4096), "b": torch.randn(4096)})
    with torchpool.open_checkpoint(path) as ck:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 8192)
        with pytest.raises(torchpool.CheckpointError) as ei:
            ck.load(mode="read")
        assert ei.value.rule == "read-short" and ei.value.tensor == "b"
        with pytest.raises(torchpool.CheckpointError, match="read-short"):
            ck.get_slice("b")[10:]
        with pytest.raises(torchpool.CheckpointError) as ei:
            ck.load(mode="direct")
        assert ei.value.rule == "read-short" and ei.value.tensor == "b"
        # the mapping path populates with MADV_POPULATE_READ: an error naming the tensor, not SIGBUS
        with pytest.raises(torchpool.CheckpointError) as ei:
            ck.load(["b"], mode="mmap")
        assert ei.value.rule == "read-short" and ei.value.tensor == "b" and "offsets" in str(ei.value)


def test_index_errors(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    write_file(d / "a.safetensors", {"x": torch.ones(2)})
    idx = d / "model.safetensors.index.json"
    for content, rule in [("{not json", "index-json"), ('{"weight_map": [1]}', "index-weight-map"),
                          ('{"weight_map": {"x": "../a.safetensors"}}', "index-shard-path"),
                          ('{"weight_map": {"x": "/etc/passwd"}}', "index-shard-path"),
                          ('{"weight_map": {"x": "b.safetensors"}}', "index-missing-shard"),
                          ('{"weight_map": {"x": "a.safetensors", "y": "a.safetensors"}}', "index-missing-tensor")]:
        idx.write_text(content)
        with pytest.raises(torchpool.CheckpointError) as ei:
            torchpool.open_checkpoint(d)
        assert ei.value.rule == rule and str(idx) in str(ei.value)
    idx.unlink()
    write_file(d / "b.safetensors", {"x": torch.ones(2)})
    with pytest.raises(torchpool.CheckpointError) as ei:
        torchpool.open_checkpoint(d)
    assert ei.value.rule == "duplicate-name" and ei.value.tensor == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(torchpool.CheckpointError, match="no-shards"):
        torchpool.open_checkpoint(empty)


VALID = file_bytes({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16),
                    "c": torch.zeros(0)}, {"k": "v"})


def _valid_bytes() -> bytes:
    header, data = VALID
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6), st.integers(0, 400))
def test_random_damage_never_crashes(edits, cut):
    buf = bytearray(_valid_bytes())
    for pos, val in edits:
        if pos < len(buf):
            buf[pos] = val
    buf = bytes(buf[: max(0, len(buf) - cut % 50)]) if cut % 3 == 0 else bytes(buf)
    try:
        h = torchpool._C.validate_bytes("fuzz", buf)
    except torchpool.CheckpointError as e:
        assert e.rule and "fuzz" in str(e)
        return
    # accepted: then every tensor lies inside the file and has exactly its bytes
    for name, dtype, tname, shape, offset, nbytes, bits in h["tensors"]:
        n = 1
        for d in shape:
            n *= d
        assert n * bits == nbytes * 8 and offset + nbytes <= len(buf)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=5), st.one_of(st.integers(), st.text(max_size=4), st.none(),
                                                                   st.lists(st.integers(-3, 2**65), max_size=3)),
                       max_size=4))
def test_random_headers_never_crash(entry_fields):
    hb = json.dumps({"t": entry_fields}).encode()
    try:
        torchpool._C.validate_bytes("fuzz", struct.pack("<Q", len(hb)) + hb)
    except torchpool.CheckpointError as e:
        assert e.rule
