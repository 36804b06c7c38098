"""Hostile checkpoints (issue 11, checkpoint side) and the newcomer's rough edges of the loader
(issue 13): each failure found by the red team has its regression test here; the same inputs are
in the libFuzzer seed corpus (tests/fuzz/corpus/header/)."""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import torchpool
from checkpoint_gen import raw_file, write_file, write_sharded
from torchpool import cli

DEEP = 70_000
HERE = Path(__file__).resolve().parent
CORPUS = HERE / "fuzz" / "corpus" / "header"


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _nest(open_, close, n=DEEP):
    return open_ * n + close * n


# ---- item 2: nesting ~70,000 deep anywhere ----
DEEP_HEADERS = {
    "dtype": b'{"a":{"dtype":' + _nest(b"[", b"]") + b',"shape":[2],"data_offsets":[0,8]}}',
    "shape": b'{"a":{"dtype":"F32","shape":' + _nest(b"[", b"]") + b',"data_offsets":[0,8]}}',
    "data_offsets": b'{"a":{"dtype":"F32","shape":[2],"data_offsets":' + _nest(b"[", b"]") + b"}}",
    "metadata": b'{"__metadata__":' + _nest(b'{"k":', b"}").replace(b'{"k":}', b'{"k":"v"}') + b"}",
    "extra-field": b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + _nest(b"[", b"]") + b"}}",
    "top-level": _nest(b"[", b"]"),
    "objects": b'{"a":' + _nest(b'{"a":', b"}").replace(b'{"a":}', b"{}") + b"}",
    "unclosed": b'{"a":{"dtype":' + b"[" * DEEP,
}


@pytest.mark.parametrize("where", sorted(DEEP_HEADERS))
def test_deep_nesting_is_a_clear_error(tmp_path, where):
    header = DEEP_HEADERS[where]
    assert len(header) > 60_000
    path = raw_file(tmp_path / f"deep-{where}.safetensors", header, b"\0" * 8)
    with pytest.raises(torchpool.CheckpointError) as ei:
        torchpool.open_checkpoint(path)
    assert ei.value.rule == "header-nesting" and ei.value.file == str(path), str(ei.value)
    assert str(path) in str(ei.value) and "64 deep" in str(ei.value)
    with pytest.raises(torchpool.CheckpointError) as e2:
        torchpool._C.validate_bytes("mem", path.read_bytes())
    assert e2.value.rule == "header-nesting"


def test_deep_nesting_through_inspect(tmp_path, capsys):
    path = raw_file(tmp_path / "deep.safetensors", DEEP_HEADERS["shape"], b"\0" * 8)
    assert cli.main(["inspect", str(path), "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["rule"] == "header-nesting" and d["file"] == str(path)


def test_nesting_up_to_the_limit_in_ignored_fields_is_accepted(tmp_path):
    limit = torchpool._C.max_header_depth
    extra = b"[" * (limit - 2) + b"]" * (limit - 2)  # root object + entry object + these = limit
    header = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + extra + b"}}"
    with torchpool.open_checkpoint(raw_file(tmp_path / "ok.safetensors", header, b"\0" * 8)) as ck:
        assert ck["a"].shape == (2,)
    header = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":[' + extra + b"]}}"
    with pytest.raises(torchpool.CheckpointError, match="header-nesting"):
        torchpool.open_checkpoint(raw_file(tmp_path / "deep.safetensors", header, b"\0" * 8))


def test_field_errors_describe_values_without_dumping_them(tmp_path):
    # a nested value inside shape: named by its flat scalars, not re-serialised
    header = {"a": {"dtype": "F32", "shape": [2, [[[1]]]], "data_offsets": [0, 8]}}
    with pytest.raises(torchpool.CheckpointError) as ei:
        torchpool.open_checkpoint(raw_file(tmp_path / "s.safetensors", header, b"\0" * 8))
    assert ei.value.rule == "shape-invalid" and "[2,[...]]" in str(ei.value)
    header = {"a": {"dtype": {"x": 1}, "shape": [2], "data_offsets": [0, 8]}}
    with pytest.raises(torchpool.CheckpointError) as ei:
        torchpool.open_checkpoint(raw_file(tmp_path / "d.safetensors", header, b"\0" * 8))
    assert ei.value.rule == "dtype-unknown" and "object" in str(ei.value)
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}}
    with pytest.raises(torchpool.CheckpointError) as ei:
        torchpool.open_checkpoint(raw_file(tmp_path / "o.safetensors", header, b"\0" * 8))
    assert ei.value.rule == "offsets-invalid" and "[0,8,9]" in str(ei.value)
    # a JSON syntax error after a bad entry is still reported as header-json
    bad = b'{"a":{"dtype":"F99","shape":[2],"data_offsets":[0,8]},"b":'
    with pytest.raises(torchpool.CheckpointError, match="header-json"):
        torchpool.open_checkpoint(raw_file(tmp_path / "j.safetensors", bad, b"\0" * 8))
    # a duplicated field inside an entry
    dup = b'{"a":{"dtype":"F32","dtype":"I32","shape":[2],"data_offsets":[0,8]}}'
    with pytest.raises(torchpool.CheckpointError, match="duplicate-name"):
        torchpool.open_checkpoint(raw_file(tmp_path / "dup.safetensors", dup, b"\0" * 8))


# ---- item 4: many tensors (quadratic before: 100k took 106 s) ----
def many_tensor_file(path, n):
    names = [f"model.layers.{i // 7}.mlp.expert_{i % 7}.weight" for i in range(n)]
    order = list(range(n))
    order = order[::2] + order[1::2]  # JSON order differs from offset order and from name order
    header = {names[i]: {"dtype": "I32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in order}
    header["__metadata__"] = {"format": "pt"}
    data = struct.pack(f"<{n}i", *range(n))
    return raw_file(path, json.dumps(header, separators=(",", ":")).encode(), data), names


def test_a_header_of_200k_tensors(tmp_path):
    n = 200_000
    path, names = many_tensor_file(tmp_path / "many.safetensors", n)
    assert path.stat().st_size > 10_000_000
    with torchpool.open_checkpoint(path) as ck:
        assert len(ck) == n and ck.keys() == sorted(names) and ck.metadata == {"format": "pt"}
        for i in (0, 1, 7, n // 2 + 3, n - 1):
            info = ck.info(names[i])
            assert info.offset == ck.shards[0].header()["data_start"] + 4 * i and info.nbytes == 4
            assert int(ck[names[i]][0]) == i
        assert torch.equal(ck.load_slices({names[n - 2]: slice(None)})[names[n - 2]], torch.tensor([n - 2], dtype=torch.int32))


# ---- item 7: what a header can make torchpool allocate ----
def _peak_rss_growth(code: str) -> tuple[int, str]:
    script = textwrap.dedent(f"""
        import resource, sys, torchpool
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        {code}
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=HERE)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    return int(lines[-1]), "\n".join(lines[:-1])


def test_nested_and_wide_ignored_values_cost_no_memory(tmp_path):
    # 20 MB of objects nested 60 deep in an ignored field of every entry: a DOM held ~69x the text.
    nested = "{" + '"k":{' * 59 + "}" * 59 + "}"
    n = 60_000
    header = "{" + ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}],"x":{nested}}}'
                            for i in range(n)) + "}"
    assert len(header) > 20_000_000
    path = raw_file(tmp_path / "nested.safetensors", header.encode(), b"\0" * n)
    grown, out = _peak_rss_growth(f"ck = torchpool.open_checkpoint({str(path)!r}); print(len(ck))")
    assert out == str(n)
    # the header text is read once (20 MB) plus the n records; a DOM took over 1 GB
    assert grown < 4 * len(header), grown


def test_memory_per_tensor_is_bounded(tmp_path):
    n = 200_000
    path, _ = many_tensor_file(tmp_path / "many.safetensors", n)
    hlen = struct.unpack("<Q", path.read_bytes()[:8])[0]
    grown, out = _peak_rss_growth(f"ck = torchpool.open_checkpoint({str(path)!r}); print(len(ck))")
    assert out == str(n)
    # Python records dominate (TensorInfo, dict): about 0.6 KB a tensor here; 2 KB is the bound
    assert grown < n * 2048, (grown, hlen)


# ---- item 11: a zero-element tensor with huge dimensions ----
@pytest.mark.parametrize("shape,ok", [([0, 4294967293, 4294967295], False), ([0, 2**62, 2], False),
                                      ([0, 2**31, 2**31, 2], False), ([2**62, 2, 0], True), ([0, 2**62], True),
                                      ([5, 0, 2**40], True)])
def test_zero_element_tensor_strides(tmp_path, shape, ok):
    path = raw_file(tmp_path / "z.safetensors", {"z": _entry(shape=shape, offsets=(0, 0))}, b"")
    try:
        torch.empty(shape)
        torch_ok = True
    except RuntimeError as e:
        assert "Stride calculation overflowed" in str(e)
        torch_ok = False
    assert torch_ok == ok  # the rule is torch's, no stricter
    if not ok:
        with pytest.raises(torchpool.CheckpointError) as ei:
            torchpool.open_checkpoint(path)
        assert ei.value.rule == "stride-overflow" and ei.value.tensor == "z"
        return
    with torchpool.open_checkpoint(path) as ck:
        assert ck["z"].shape == tuple(shape) and ck.load(mode="read")["z"].shape == tuple(shape)
        assert ck.get_slice("z")[...].shape == tuple(shape)


def test_f4_strides_use_torch_shape(tmp_path):
    # F4: torch's last dimension is half the file's, so the file's [0, 2**62, 4] is torch's [0, 2**62, 2]
    path = raw_file(tmp_path / "f4.safetensors", {"z": _entry("F4", shape=[0, 2**62, 4], offsets=(0, 0))}, b"")
    with pytest.raises(torchpool.CheckpointError, match="stride-overflow"):
        torchpool.open_checkpoint(path)
    path = raw_file(tmp_path / "f4b.safetensors", {"z": _entry("F4", shape=[0, 2**61, 2], offsets=(0, 0))}, b"")
    with torchpool.open_checkpoint(path) as ck:
        assert ck["z"].shape == (0, 2**61, 1)


# ---- item 8: SIGBUS after a shard shrinks ----
SIGBUS_CHILD = textwrap.dedent("""
    import os, sys, torch, torchpool
    path, how = sys.argv[1], sys.argv[2]
    if how == "item":
        t = torchpool.open_checkpoint(path)["big"]
    elif how == "load":
        t = torchpool.open_checkpoint(path).load()["big"]
    elif how == "lazy":
        model = torch.nn.Linear(512, 512, bias=False, device="meta")
        torchpool.load_lazily(model, path, strict=False)
        torchpool.lazy.materialize(model)
        t = model.weight
    elif how == "copy":
        ck = torchpool.open_checkpoint(path, copy=True)
        t, u = ck["big"], ck.load()["big"]
    os.truncate(path, 4096)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    print("sum", float(t.float().sum()), flush=True)
""")


def _sigbus_file(tmp_path, name="big"):
    path = tmp_path / "shrinks.safetensors"
    write_file(path, {"a": torch.ones(10), name: torch.ones(512, 512)})
    return path


@pytest.mark.parametrize("how", ["item", "load", "lazy"])
@pytest.mark.parametrize("faulthandler", [False, True])
def test_sigbus_names_the_file_then_the_process_dies(tmp_path, how, faulthandler):
    path = _sigbus_file(tmp_path, "weight" if how == "lazy" else "big")
    args = [sys.executable] + (["-X", "faulthandler"] if faulthandler else []) + ["-c", SIGBUS_CHILD, str(path), how]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr)
    assert "sum" not in r.stdout
    tensor = "weight" if how == "lazy" else "big"
    assert f"torchpool: SIGBUS at {path} file offset" in r.stderr and f"(tensor '{tensor}')" in r.stderr, r.stderr
    assert "copy=True" in r.stderr
    assert r.stderr.count("torchpool: SIGBUS") == 1  # threads faulting together: one whole message
    if faulthandler:  # chained: faulthandler's traceback follows
        assert "Fatal Python error: Bus error" in r.stderr and r.stderr.index("torchpool: SIGBUS") < r.stderr.index("Fatal Python")


def test_copy_mode_survives_a_shrinking_file(tmp_path):
    path = _sigbus_file(tmp_path)
    r = subprocess.run([sys.executable, "-c", SIGBUS_CHILD, str(path), "copy"], capture_output=True, text=True,
                       timeout=300, cwd=HERE)
    assert r.returncode == 0 and "sum 262144.0" in r.stdout, r.stderr


def test_copy_mode_hands_out_owned_memory(tmp_path):
    path = _sigbus_file(tmp_path)
    with torchpool.open_checkpoint(path, copy=True) as ck:
        base = ck.shards[0].address
        end = base + ck.shards[0].file_size
        t = ck["big"]
        assert not base <= t.data_ptr() < end and torch.equal(t, torch.ones(512, 512))
        sd = ck.load()
        assert ck.stats()["last_load_path"] == "direct"
        assert all(not base <= v.data_ptr() < end for v in sd.values() if v.numel())
        with pytest.raises(ValueError, match="copy=True"):
            ck.load(mode="mmap")
    with torchpool.open_checkpoint(path) as ck:  # the default still maps
        assert ck.shards[0].address <= ck["big"].data_ptr() < ck.shards[0].address + ck.shards[0].file_size
    assert torchpool._C.sigbus_handler_installed()


def test_sigbus_handler_leaves_other_sigbus_alone(tmp_path):
    # a SIGBUS sent by kill still kills with SIGBUS (handed back to the default action), no message
    path = _sigbus_file(tmp_path)
    code = f"import os, signal, torchpool; ck = torchpool.open_checkpoint({str(path)!r}); os.kill(os.getpid(), signal.SIGBUS)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=HERE)
    assert r.returncode == -signal.SIGBUS and "torchpool: SIGBUS" not in r.stderr


# ---- issue 13: inspect on a text file, --json | head, shard order ----
def test_inspect_a_text_file_says_not_safetensors(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("hello world, this is not a checkpoint\n" * 10)
    assert cli.main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "not-safetensors" in out and "not a safetensors file" in out and "hello wo" in out
    assert "header-too-large" not in out
    # a real checkpoint whose length is too large keeps its own rule
    bad = raw_file(tmp_path / "big.safetensors", {"a": _entry()}, b"\0" * 8, length=100_000_001)
    with pytest.raises(torchpool.CheckpointError, match="header-too-large"):
        torchpool.open_checkpoint(bad)


def test_inspect_json_into_head_ends_quietly(tmp_path):
    sd = {f"layer.{i}.weight": torch.ones(2) for i in range(5000)}
    path = tmp_path / "m.safetensors"
    write_file(path, sd)
    p = subprocess.Popen([sys.executable, "-m", "torchpool", "inspect", str(path), "--json", "--top", "5000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE)
    first = p.stdout.readline()
    p.stdout.close()  # what `| head -1` does
    err = p.stderr.read().decode()
    rc = p.wait(timeout=300)
    assert first.strip() == b"{"
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert rc == 141


def test_shards_in_natural_order(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    for i in (1, 2, 10, 11):
        write_file(d / f"model-{i}-of-11.safetensors", {f"w{i}": torch.full((2,), float(i))})
    with torchpool.open_checkpoint(d) as ck:
        assert [p.name for p in ck.shard_paths] == [f"model-{i}-of-11.safetensors" for i in (1, 2, 10, 11)]
        assert ck.keys() == ["w1", "w2", "w10", "w11"]
    # an index listing the shards out of order
    idx = {"metadata": {}, "weight_map": {f"w{i}": f"model-{i}-of-11.safetensors" for i in (10, 2, 11, 1)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with torchpool.open_checkpoint(d) as ck:
        assert [p.name for p in ck.shard_paths] == [f"model-{i}-of-11.safetensors" for i in (1, 2, 10, 11)]
        assert ck.keys() == ["w10", "w2", "w11", "w1"]  # the index's order, as before
        assert float(ck["w10"][0]) == 10.0


# ---- issue 13: misspelt names, get_slice lists ----
def test_misspelt_name_suggests_close_matches(tmp_path):
    path = tmp_path / "m.safetensors"
    write_file(path, {"model.layers.0.self_attn.q_proj.weight": torch.ones(2),
                      "model.layers.0.self_attn.k_proj.weight": torch.ones(2), "lm_head.weight": torch.ones(2)})
    with torchpool.open_checkpoint(path) as ck:
        with pytest.raises(KeyError) as ei:
            ck["model.layers.0.self_atn.q_proj.weight"]
        e = ei.value
        assert isinstance(e, torchpool.checkpoint.TensorNotFoundError)
        assert e.matches[0] == "model.layers.0.self_attn.q_proj.weight"
        assert str(e).startswith("'model.layers.0.self_atn.q_proj.weight' is not a tensor of") and "did you mean" in str(e)
        with pytest.raises(KeyError) as ei:
            ck.get_slice("nothing_like_it")
        assert ei.value.matches == [] and "did you mean" not in str(ei.value)
        assert "lm_head.weigth" not in ck


@pytest.mark.parametrize("key", [[1, 2], [3, 0, 3], (slice(None), [5, 0, 2]), (0, [1, 3]), ([3, -1], slice(1, 4)),
                                 ([],), (Ellipsis, [5]), torch.tensor([2, 1]), ([0, 2], [1, 4]), range(1, 3),
                                 (slice(1, None, 2), [4])])
def test_get_slice_with_lists(tmp_path, key):
    t = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)
    path = tmp_path / "w.safetensors"
    write_file(path, {"w": t})
    with torchpool.open_checkpoint(path) as ck:
        got, want = ck.get_slice("w")[key], t[key]
        assert got.shape == want.shape and torch.equal(got, want)
        assert torch.equal(ck.load_slices({"w": key})["w"], want)


@pytest.mark.parametrize("key", [None, 1.5, [True, False], [[1]], torch.ones(2, dtype=torch.bool), [9], "a"])
def test_get_slice_bad_indices_are_index_errors(tmp_path, key):
    path = tmp_path / "w.safetensors"
    write_file(path, {"w": torch.zeros(4, 6)})
    with torchpool.open_checkpoint(path) as ck:
        with pytest.raises(IndexError, match="'w'"):
            ck.get_slice("w")[key]


def test_dtype_mismatch_suggests_dtype(tmp_path):
    path = tmp_path / "w.safetensors"
    write_file(path, {"weight": torch.ones(3, 3, dtype=torch.bfloat16)})
    with pytest.raises(RuntimeError, match=r"(?i)pass dtype=torch\.float32 to convert"):
        torchpool.load_lazily(torch.nn.Linear(3, 3, bias=False, device="meta"), path)


# ---- the fuzz corpus holds every failure above ----
def test_fuzz_corpus_files_are_handled():
    files = sorted(CORPUS.iterdir())
    assert len(files) >= 10 and any(f.stat().st_size > 8192 for f in files)
    for f in files:
        try:
            torchpool._C.validate_bytes(f.name, f.read_bytes())
        except torchpool.CheckpointError as e:
            assert e.rule and f.name in str(e)
