"""One torchrun rank of tests/test_distributed.py (gloo, CPU): loads checkpoints through
``dcp.load(..., storage_reader=torchpool.distributed.HFStorageReader(path))`` into FSDP2, TP and
hand-made DTensor state dicts, checks every local shard against the checkpoint read by the
safetensors package, and writes what it saw to <out>/<scenario>-rank<r>.json for the test to assert.

    python -m torch.distributed.run --nproc_per_node N tests/dist_worker.py CONFIG.json

A scenario that fails records its error and the worker goes on to the next one (the collectives of
dcp.load are symmetric, so every rank fails the same scenario the same way)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from torchpool.distributed import HFStorageReader

RANK = WORLD = 0


def reference(path: Path) -> dict:
    """The checkpoint as the safetensors package reads it (another implementation)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def expected_local(name: str, t, full: dict) -> torch.Tensor:
    """The checkpoint's slice that the local part of t (DTensor or plain tensor) must hold."""
    src = full[name]
    if isinstance(t, DTensor):
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        src = src[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
    return src


def local(t) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def check_state_dict(sd: dict, full: dict) -> dict:
    """Every local shard equals the checkpoint's slice (converted to the target dtype); the bytes a
    rank should request (its local shards, in the file's dtype) by kind."""
    local_bytes = {"sharded": 0, "replicated": 0, "sharded_full": 0}
    for name, t in sd.items():
        want = expected_local(name, t, full)
        got = local(t)
        assert got.shape == want.shape, (name, tuple(got.shape), tuple(want.shape))
        assert torch.equal(got, want.to(got.dtype)), f"{name}: local shard differs from the checkpoint"
        n = want.numel() * want.element_size()
        sharded = isinstance(t, DTensor) and any(p.is_shard() for p in t.placements)
        local_bytes["sharded" if sharded else "replicated"] += n
        if sharded:
            local_bytes["sharded_full"] += full[name].numel() * want.element_size()
    return local_bytes


def all_sum(x: int) -> int:
    v = torch.tensor([int(x)], dtype=torch.int64)
    dist.all_reduce(v)
    return int(v[0])


def hf_model(cfg_dir: str, device="cpu", meta=False):
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(cfg_dir)
    torch.manual_seed(1234 + RANK)  # different garbage on every rank: the load must overwrite it
    if meta:
        with torch.device("meta"):
            return LlamaForCausalLM(cfg)
    return LlamaForCausalLM(cfg).to(device)


def reference_logits(cfg: dict, ids):
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(cfg["llama"], dtype=torch.float32)
    with torch.no_grad():
        return ref(ids).logits


# ---------------------------------------------------------------- scenarios
def scenario_fsdp(cfg: dict) -> dict:
    """FSDP2: fully_shard every decoder layer and the root on a CPU mesh; load with the README's recipe
    (dcp.load into model.state_dict()), then again through get/set_model_state_dict."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = hf_model(cfg["llama"])
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    full = reference(Path(cfg["llama"]))
    reader = HFStorageReader(cfg["llama"])
    dcp.load(model.state_dict(), storage_reader=reader)  # the README recipe
    got = check_state_dict(model.state_dict(), full)
    # the same through the state_dict API: a fresh model, get -> dcp.load -> set
    model2 = hf_model(cfg["llama"])
    for layer in model2.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model2, mesh=mesh)
    sd = get_model_state_dict(model2)
    reader2 = HFStorageReader(cfg["llama"])
    dcp.load(sd, storage_reader=reader2)
    set_model_state_dict(model2, sd)
    check_state_dict(model2.state_dict(), full)
    ids = torch.arange(12).reshape(2, 6) % 100
    with torch.no_grad():
        logits = model2(ids).logits
    ok = torch.allclose(logits, reference_logits(cfg, ids), atol=1e-5, rtol=1e-4)
    return {"expected": got, "requested": reader.bytes_requested, "requested2": reader2.bytes_requested,
            "stats": reader.stats(), "total": all_sum(reader.bytes_requested), "forward_matches": bool(ok)}


TP_PLAN_COL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
TP_PLAN_ROW = ("self_attn.o_proj", "mlp.down_proj")


def scenario_tp(cfg: dict) -> dict:
    """TP: parallelize_module with colwise q/k/v/gate/up and rowwise o/down; embeddings, norms and the
    head stay plain (replicated) tensors: a mix of DTensors and plain tensors. The checkpoint is bf16,
    the model float32 (fused conversion)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (WORLD,))
    model = hf_model(cfg["llama"])
    plan = {}
    for i in range(len(model.model.layers)):
        for p in TP_PLAN_COL:
            plan[f"model.layers.{i}.{p}"] = ColwiseParallel()
        for p in TP_PLAN_ROW:
            plan[f"model.layers.{i}.{p}"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)
    full = reference(Path(cfg["llama_bf16"]))
    reader = HFStorageReader(cfg["llama_bf16"])
    dcp.load(model.state_dict(), storage_reader=reader)
    sd = model.state_dict()
    got = check_state_dict(sd, full)
    kinds = sorted({type(local(t)).__name__ + ":" + ",".join(map(str, getattr(t, "placements", ()))) for t in sd.values()})
    ids = torch.arange(12).reshape(2, 6) % 100
    with torch.no_grad():
        logits = model(ids).logits
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(cfg["llama_bf16"], dtype=torch.float32)
    with torch.no_grad():
        ok = torch.allclose(logits, ref(ids).logits, atol=1e-4, rtol=1e-3)
    return {"expected": got, "requested": reader.bytes_requested, "stats": reader.stats(),
            "total": all_sum(reader.bytes_requested), "kinds": kinds, "forward_matches": bool(ok)}


def scenario_dtensor(cfg: dict) -> dict:
    """A DTensor dict with Shard(0) / Shard(1) / Replicate placements (uneven sizes), plain tensors and a
    float32 target for a bf16 tensor, loaded with every read path."""
    mesh = init_device_mesh("cpu", (WORLD,))
    path = Path(cfg["dtensor"])
    full = reference(path)
    out = {}
    for mode in ("auto", "pread", "map", "staged"):
        placements = (Shard(0), Shard(1), Replicate())
        sd = {}
        for k, (name, t) in enumerate(sorted(full.items())):
            garbage = torch.full_like(t, 7)
            if t.dim() == 2 and k % 4 != 3:
                sd[name] = distribute_tensor(garbage, mesh, [placements[k % 4]])
            elif t.dim() == 1 and k % 2:
                sd[name] = distribute_tensor(garbage, mesh, [Shard(0)])
            else:
                sd[name] = garbage  # plain tensor: read whole on every rank
        sd["lm_head.weight"] = distribute_tensor(torch.zeros(full["lm_head.weight"].shape), mesh, [Shard(1)])  # fp32 <- bf16
        if mode == "auto" and RANK == 0:
            evict(path)  # cold, so that "auto" takes the pread path for row blocks (if the FS can drop pages)
        dist.barrier()
        reader = HFStorageReader(str(path), mode=mode, gather_below=cfg.get("gather_below", 64 << 10))
        dcp.load(sd, storage_reader=reader)
        got = check_state_dict(sd, full)
        out[mode] = {"expected": got, "requested": reader.bytes_requested, "stats": reader.stats(),
                     "total": all_sum(reader.bytes_requested)}
    out["nbytes"] = sum(t.numel() * t.element_size() for t in full.values())
    return out


def evict(path: Path):
    for f in (sorted(path.glob("*.safetensors")) if path.is_dir() else [path]):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def scenario_errors(cfg: dict) -> dict:
    """Broken checkpoints: the same clear error on every rank, and no hang, also when only one rank's
    path is broken."""
    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for case, paths in cfg["broken"].items():
        path = paths[RANK % len(paths)]
        sd = {"model.norm.weight": distribute_tensor(torch.zeros(cfg["norm_size"]), mesh, [Shard(0)])}
        try:
            dcp.load(sd, storage_reader=HFStorageReader(path))
            out[case] = {"raised": None}
        except BaseException as e:  # CheckpointException is a BaseException
            failures = getattr(e, "failures", {})
            out[case] = {"raised": type(e).__name__, "message": str(e), "failed_ranks": sorted(failures)}
    return out


SCENARIOS = {"fsdp": scenario_fsdp, "tp": scenario_tp, "dtensor": scenario_dtensor, "errors": scenario_errors}


def main():
    global RANK, WORLD
    cfg = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo", timeout=timedelta(seconds=cfg.get("pg_timeout", 120)))
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    out = Path(cfg["out"])
    try:
        for name in cfg["scenarios"]:
            try:
                res = {"ok": True, **SCENARIOS[name](cfg)}
            except BaseException as e:  # record it; every rank takes part in the next scenario
                res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            (out / f"{name}-rank{RANK}.json").write_text(json.dumps(res, default=str))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
