"""Tensor-parallel ranks: 2 gloo ranks on localhost, each reads only its slice of every weight; the
slices are right, and together the ranks read the checkpoint once (counted by the reader)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from checkpoint_gen import llama_like, write_sharded

ROW_PARALLEL = ("o_proj", "down_proj")  # split the input dimension; everything else splits dim 0


def _split(name: str, shape, rank: int, world: int):
    """The slice key a rank takes of a tensor (Megatron-style column/row parallel)."""
    dim = 1 if any(p in name for p in ROW_PARALLEL) and len(shape) == 2 else 0
    n = shape[dim]
    per = -(-n // world)
    a, b = min(n, rank * per), min(n, (rank + 1) * per)
    return (slice(None), slice(a, b)) if dim == 1 else (slice(a, b),)


def _rank_main(rank: int, world: int, port: int, index: str, out_dir: str):
    import torchpool
    from safetensors.torch import load_file

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ck = torchpool.open_checkpoint(index)
        ck.reset_stats()
        names = ck.keys()
        half = len(names) // 2  # one half through get_slice, the other in one batch
        mine = {name: ck.get_slice(name)[_split(name, ck.info(name).torch_shape, rank, world)] for name in names[:half]}
        mine.update(ck.load_slices({n: _split(n, ck.info(n).torch_shape, rank, world) for n in names[half:]}))
        read = ck.stats()["bytes_read"]
        # check the slices against the reference reader (not counted: it is another reader)
        full = {}
        for shard in ck.shard_paths:
            full.update(load_file(str(shard)))
        for name, t in mine.items():
            assert torch.equal(t, full[name][_split(name, full[name].shape, rank, world)]), name
        # a column-parallel matmul with the slices equals the full one
        name = "model.layers.0.mlp.up_proj.weight"
        x = torch.randn(3, full[name].shape[1], generator=torch.Generator().manual_seed(0))
        part = x @ mine[name].float().T
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part)
        assert torch.allclose(torch.cat(parts, dim=1), x @ full[name].float().T, atol=1e-5)
        # the same slices through torch.distributed.checkpoint and HFStorageReader (one box reader):
        # DTensors Shard(0)/Shard(1) chunk as _split does; the same bytes, the same byte count
        import torch.distributed.checkpoint as dcp
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from torchpool.distributed import HFStorageReader

        mesh = init_device_mesh("cpu", (world,))
        sd = {n: distribute_tensor(torch.zeros(full[n].shape, dtype=full[n].dtype), mesh,
                                   [Shard(len(_split(n, full[n].shape, rank, world)) - 1)]) for n in names}
        reader = HFStorageReader(index, mode="pread")
        dcp.load(sd, storage_reader=reader)
        for n in names:
            assert torch.equal(sd[n].to_local(), mine[n]), n
        assert reader.bytes_requested == read == reader.stats()["bytes_pread"]
        totals = torch.tensor([read], dtype=torch.int64)
        dist.all_reduce(totals)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"read": read, "total": int(totals[0]), "nbytes": ck.nbytes}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_read_the_checkpoint_once(tmp_path):
    pytest.importorskip("safetensors")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    sd = llama_like(layers=2, hidden=64, inter=96, vocab=128, dtype=torch.bfloat16, seed=7)
    index = write_sharded(tmp_path / "ck", sd, 2)
    world = 2
    mp.spawn(_rank_main, args=(world, _free_port(), str(index), str(tmp_path)), nprocs=world, join=True)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    nbytes = res[0]["nbytes"]
    assert nbytes == sum(t.nbytes for t in sd.values())
    assert res[0]["total"] == res[1]["total"] == sum(r["read"] for r in res)
    # together about once (exactly once here: the splits are disjoint and cover every tensor) ...
    assert res[0]["total"] == nbytes
    # ... and each rank about half
    for r in res:
        assert 0.4 * nbytes <= r["read"] <= 0.6 * nbytes
