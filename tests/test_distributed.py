"""torchpool.distributed.HFStorageReader under torchrun (gloo, CPU), 2 and 4 ranks: a tiny
transformers Llama saved with save_pretrained in shards, loaded into FSDP2 and TP models with
dcp.load; a DTensor dict with Shard(0) / Shard(1) / Replicate through every read path; broken
checkpoints. One torchrun launch per world size runs every scenario (tests/dist_worker.py); each test
asserts on what the ranks wrote."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from checkpoint_gen import llama_like, write_sharded

HERE = Path(__file__).resolve().parent
TIMEOUT = float(os.environ.get("TORCHPOOL_DIST_TEST_TIMEOUT", "420"))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def tiny_llama_dirs(root: Path) -> tuple[Path, Path]:
    """A tiny LlamaForCausalLM saved by transformers in several shards with an index: float32, and a
    bfloat16 copy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    f32, b16 = root / "llama", root / "llama_bf16"
    model.save_pretrained(f32, max_shard_size="100KB", safe_serialization=True)
    model.to(torch.bfloat16).save_pretrained(b16, max_shard_size="100KB", safe_serialization=True)
    for d in (f32, b16):
        assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) > 1
    return f32, b16


def broken_copies(good: Path, root: Path) -> dict:
    def copy(name):
        dst = root / name
        shutil.copytree(good, dst)
        return dst

    shards = sorted(p.name for p in good.glob("*.safetensors"))
    trunc = copy("truncated")
    with open(trunc / shards[-1], "r+b") as f:
        f.truncate((trunc / shards[-1]).stat().st_size - 100)
    missing = copy("missing_shard")
    (missing / shards[0]).unlink()
    bad = copy("bad_header")
    raw = bytearray((bad / shards[0]).read_bytes())
    raw[8:12] = b"\x00\x01{]"
    (bad / shards[0]).write_bytes(bytes(raw))
    return {
        "truncated": ([str(trunc)], "data-past-eof", shards[-1]),
        "missing_shard": ([str(missing)], "index-missing-shard", shards[0]),
        "bad_header": ([str(bad)], "header-utf8|header-json", shards[0]),
        "one_rank_broken": ([str(good), str(trunc)], "data-past-eof", shards[-1]),
    }


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def launched(request, tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    world = request.param
    root = tmp_path_factory.mktemp(f"dist{world}")
    llama, llama_bf16 = tiny_llama_dirs(root)
    sd = llama_like(layers=2, hidden=64, inter=96, vocab=130, dtype=torch.bfloat16, seed=3)
    dt_index = write_sharded(root / "dtensor", sd, 3)
    broken = broken_copies(dt_index.parent, root)
    out = root / "out"
    out.mkdir()
    cfg = {"out": str(out), "llama": str(llama), "llama_bf16": str(llama_bf16), "dtensor": str(dt_index.parent),
           "broken": {k: v[0] for k, v in broken.items()}, "norm_size": 64, "pg_timeout": 120,
           "scenarios": ["fsdp", "tp", "dtensor", "errors"]}
    (root / "cfg.json").write_text(json.dumps(cfg))
    env = dict(os.environ)
    env.pop("TORCHPOOL_CONF", None)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(HERE / "dist_worker.py"), str(root / "cfg.json")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT, cwd=str(HERE))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun with {world} ranks did not finish in {TIMEOUT} s (hang?)\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"

    def results(name):
        res = [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in range(world)]
        for r in res:
            assert r["ok"], r.get("traceback", r)
        return res

    return world, results, broken, sd


def _check_bytes(world, res, exact_total=True):
    """Each rank asked for exactly its local shards' bytes; together the sharded tensors once and the
    replicated ones once per rank; each rank about 1/N of the sharded bytes."""
    sharded_full = res[0]["expected"]["sharded_full"]
    replicated = res[0]["expected"]["replicated"]
    assert sharded_full > 0
    for r in res:
        e = r["expected"]
        assert r["requested"] == e["sharded"] + e["replicated"], r
        assert e["replicated"] == replicated and e["sharded_full"] == sharded_full
        assert 0.7 / world * sharded_full <= e["sharded"] <= 1.3 / world * sharded_full, (e, world)
    assert sum(r["expected"]["sharded"] for r in res) == sharded_full
    assert res[0]["total"] == sharded_full + world * replicated


def test_fsdp2_llama(launched):
    world, results, _, _ = launched
    res = results("fsdp")
    _check_bytes(world, res)
    for r in res:
        assert r["requested2"] == r["requested"]  # get/set_model_state_dict reads the same
        assert r["expected"]["replicated"] == 0  # FSDP2 shards every parameter
        assert r["forward_matches"], "the FSDP2 model's logits differ from transformers' from_pretrained"


def test_tp_llama_colwise_rowwise_mixed_with_plain_tensors(launched):
    world, results, _, _ = launched
    res = results("tp")
    _check_bytes(world, res)
    kinds = set(res[0]["kinds"])
    assert "Tensor:S(0)" in kinds and "Tensor:S(1)" in kinds and "Tensor:" in kinds, kinds
    for r in res:
        assert r["stats"]["boxes"]["map"] > 0  # bf16 -> float32: converted while gathered
        assert r["forward_matches"], "the TP model's logits differ from transformers' from_pretrained"


@pytest.mark.parametrize("mode", ["auto", "pread", "map", "staged"])
def test_dtensor_shard0_shard1_replicate(launched, mode):
    world, results, _, sd = launched
    res = [r[mode] for r in results("dtensor")]
    _check_bytes(world, res)
    st = [r["stats"] for r in res]
    for s, r in zip(st, res):
        assert s["bytes_requested"] == r["requested"]
        if mode == "pread":  # every byte through pread, exactly the requested ones (float32 target aside)
            assert s["boxes"]["map"] == 1 and s["bytes_pread"] < s["bytes_requested"]
        if mode == "staged":
            assert s["bytes_pread"] == s["bytes_requested"] and s["boxes"]["staged"] > 0
        if mode == "map":
            assert s["bytes_pread"] == 0 and s["bytes_mapped"] >= s["bytes_requested"]


@pytest.mark.parametrize("case", ["truncated", "missing_shard", "bad_header", "one_rank_broken"])
def test_broken_checkpoint_same_error_on_every_rank(launched, case):
    world, results, broken, _ = launched
    res = [r[case] for r in results("errors")]
    _paths, rule, shard = broken[case]
    expect_failed = list(range(world)) if case != "one_rank_broken" else [r for r in range(world) if r % 2]
    for r in res:
        assert r["raised"] == "CheckpointException", r
        assert re.search(f"rule ({rule})", r["message"]), r["message"]
        assert shard in r["message"], r["message"]
        assert r["failed_ranks"] == expect_failed


def test_readme_recipe(tmp_path):
    """The README's three-line dcp.load recipe, run as written (path and model substituted), without a
    process group."""
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    llama, _ = tiny_llama_dirs(tmp_path)
    text = (HERE.parent / "README.md").read_text()
    m = re.search(r"```python\n(import torch.distributed.checkpoint as dcp\n.*?)```", text, re.S)
    assert m, "README has no dcp.load recipe block"
    code = m.group(1)
    assert len([ln for ln in code.splitlines() if ln.strip() and not ln.startswith("#")]) == 3
    model = LlamaForCausalLM.from_pretrained(llama)
    torch.manual_seed(5)
    for p in model.parameters():
        p.data.normal_()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(code.replace('"llama/"', repr(str(llama))), {"model": model})
    ref = LlamaForCausalLM.from_pretrained(llama)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------- one process: the box reader itself
def _boxes_ck(tmp_path):
    from checkpoint_gen import write_file

    g = torch.Generator().manual_seed(11)
    tensors = {
        "m": torch.randn(37, 53, generator=g).to(torch.bfloat16),
        "cube": torch.randn(5, 7, 9, generator=g),
        "wide": torch.randn(3, 40000, generator=g).to(torch.float16),  # rows of 80 KB: runs above gather_below
        "vec": torch.arange(11, dtype=torch.int64),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }
    return write_file(tmp_path / "boxes.safetensors", tensors), tensors


@pytest.mark.parametrize("mode", ["auto", "pread", "map", "staged"])
def test_read_boxes_every_geometry_and_path(tmp_path, mode):
    """Random boxes of 0- to 3-d tensors, into float32 / same-dtype / transposed destinations, against
    plain indexing of the tensors; the requested counter is exactly the boxes' bytes."""
    import random

    import torchpool
    from torchpool.checkpoint._ranges import Box, read_boxes

    path, tensors = _boxes_ck(tmp_path)
    rnd = random.Random(0)
    with torchpool.open_checkpoint(path) as ck:
        for _ in range(60):
            name = rnd.choice(sorted(tensors))
            src = tensors[name]
            start, stop = [], []
            for n in src.shape:
                a = rnd.randrange(0, n + 1)
                b = rnd.randrange(a, n + 1)
                start.append(a)
                stop.append(b)
            want = src[tuple(slice(a, b) for a, b in zip(start, stop))]
            kind = rnd.choice(["same", "float32", "transposed"])
            if kind == "same":
                t = torch.full_like(want, 1)
            elif kind == "float32":
                t = torch.full(want.shape, 1.0)
            else:
                t = torch.full(tuple(reversed(want.shape)), 1, dtype=src.dtype).T if want.dim() == 2 else torch.full_like(want, 1)
            st = read_boxes(ck, [Box(name, start, stop, t)], mode=mode, gather_below=rnd.choice([0, 64 << 10]))
            assert torch.equal(t, want.to(t.dtype)), (name, start, stop, kind)
            assert st.requested == want.numel() * src.element_size()
        with pytest.raises(ValueError, match="outside tensor 'm'"):
            read_boxes(ck, [Box("m", [0, 0], [38, 53], torch.empty(38, 53))])
        with pytest.raises(ValueError, match="destination has shape"):
            read_boxes(ck, [Box("m", [0, 0], [2, 2], torch.empty(3, 2))])
        with pytest.raises(KeyError):
            read_boxes(ck, [Box("nope", [0], [1], torch.empty(1))])


def test_reader_without_process_group(tmp_path):
    """dcp.load in one process (no process group): plain tensors, a dtype conversion, checkpoint_id=
    through reset(), validate_checkpoint_id, and an unknown key in the state dict."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from torchpool.distributed import HFStorageReader

    sd = llama_like(layers=1, hidden=32, inter=48, vocab=40, dtype=torch.bfloat16, seed=2)
    idx = write_sharded(tmp_path / "ck", sd, 2)
    assert HFStorageReader.validate_checkpoint_id(idx) and HFStorageReader.validate_checkpoint_id(idx.parent)
    assert not HFStorageReader.validate_checkpoint_id(tmp_path)
    target = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in sd.items()}
    reader = HFStorageReader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=idx, storage_reader=reader)
        for k, v in sd.items():
            assert torch.equal(target[k], v.float()), k
        assert reader.bytes_requested == sum(v.nbytes for v in sd.values())
        with pytest.raises(BaseException, match="lm_head.bias"):
            dcp.load({"lm_head.bias": torch.zeros(3)}, storage_reader=HFStorageReader(idx))
