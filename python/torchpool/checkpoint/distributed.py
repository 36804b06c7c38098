"""torchpool as the reader of ``torch.distributed.checkpoint`` for Hugging Face safetensors.

    import torch.distributed.checkpoint as dcp
    from torchpool.distributed import HFStorageReader

    sd = model.state_dict()                    # DTensors from fully_shard / parallelize_module, or plain tensors
    dcp.load(sd, storage_reader=HFStorageReader("llama/"))   # a file, a shard directory or an index .json

Each rank reads only the bytes of its own local shards (Note [Reading a box] in _ranges.py); the
metadata comes from the shard headers through torchpool's validating parser, so a broken checkpoint
raises the same ``CheckpointError`` (file, tensor, rule) as ``torchpool.open_checkpoint``.  See
docs/reference/distributed.md.

Note [One chunk per tensor]
---------------------------
Rationale: DCP's planners intersect each rank's local shards (``DTensor`` placements) with the
chunks the storage says it holds; an HF checkpoint holds every tensor whole.  Approach:
``read_metadata`` describes each tensor as one chunk at offset 0 of its full (torch) shape and
dtype, and every ``ReadItem`` the planner makes is then a box of that tensor (``storage_offsets`` /
``lengths``), read by ``read_boxes``.  Tensors whose dtype torch cannot represent (F6_*) are left out
of the metadata: asking for one fails in the planner as a missing key, and no bytes are made up.
Errors: DCP runs ``read_metadata`` and ``read_data`` on every rank inside its collectives and turns a
failure on any rank into a ``CheckpointException`` raised on every rank (no hang), whose
``failures`` map each failing rank to its ``CheckpointError``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import StorageReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from ._ranges import GATHER_BELOW, PATHS, Box, RangeStats, read_boxes
from .reader import Checkpoint, CheckpointError

__all__ = ["HFStorageReader"]


class HFStorageReader(StorageReader):
    """A ``torch.distributed.checkpoint.StorageReader`` for a safetensors file, a shard directory or a
    Hugging Face index (``model.safetensors.index.json``).

    Options: ``readers`` (8 reader threads per rank), ``mode`` ("auto"; "pread", "map" or "staged"
    force a path: Note [Reading a box]), ``gather_below`` (runs shorter than this many bytes are
    gathered from the mapping, 64 KiB; 0 reads every run with its own ``pread``), ``staging_bytes`` /
    ``chunk_bytes`` / ``staging_upstream`` (the staging pool of device targets).

    Counters (this rank, since construction or ``reset_stats()``): ``bytes_requested`` (the bytes of
    the boxes read: what this rank asked the storage for), and ``stats()`` with ``bytes_pread`` and
    ``bytes_mapped`` besides."""

    def __init__(self, path: str | os.PathLike | None = None, *, readers: int = 8, mode: str = "auto",
                 gather_below: int = GATHER_BELOW, staging_bytes: int = 64 << 20, chunk_bytes: int = 8 << 20,
                 staging_upstream: str = "host_pinned"):
        super().__init__()
        if mode not in PATHS:
            raise ValueError(f"mode must be one of {PATHS}, not {mode!r}")
        if int(readers) < 1:
            raise ValueError(f"readers must be >= 1, not {readers!r}")
        if int(gather_below) < 0:
            raise ValueError(f"gather_below must be >= 0, not {gather_below!r}")
        self.path = None if path is None else os.fspath(path)
        self.mode = mode
        self.gather_below = int(gather_below)
        self._ck_options = dict(readers=int(readers), staging_bytes=int(staging_bytes), chunk_bytes=int(chunk_bytes),
                                staging_upstream=staging_upstream)
        self._ck: Checkpoint | None = None
        self._stats = RangeStats()
        self.load_id = uuid.uuid4().hex

    # ---- StorageReader ----
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.close()
            self.path = os.fspath(checkpoint_id)
        self.load_id = uuid.uuid4().hex

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        p = Path(checkpoint_id)
        if p.is_file():
            return p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json")
        return p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json")))

    def checkpoint(self) -> Checkpoint:
        """The open checkpoint (opened, and every header validated, on first use)."""
        if self._ck is None or self._ck.closed:
            if self.path is None:
                raise ValueError("HFStorageReader: no checkpoint path (pass one, or checkpoint_id= to dcp.load)")
            self._ck = Checkpoint(self.path, **self._ck_options)
        return self._ck

    def read_metadata(self) -> Metadata:
        # no **kwargs: DCP would call it again with rank= after a failure (the rank-local fallback)
        ck = self.checkpoint()
        sd_md: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, str] = {}
        for name in ck.keys():
            info = ck.info(name)
            if info.torch_dtype is None:
                continue  # Note [One chunk per tensor]: no torch dtype (F6_*), no entry
            shape = torch.Size(info.torch_shape)
            zero = torch.Size([0] * len(shape))
            sd_md[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=info.torch_dtype),
                size=shape,
                chunks=[ChunkStorageMetadata(offsets=zero, sizes=shape)],
            )
            storage[MetadataIndex(name, zero)] = name
        return Metadata(state_dict_metadata=sd_md, storage_data=storage,
                        storage_meta=StorageMeta(checkpoint_id=self.path, load_id=self.load_id))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.checkpoint()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        ck = self.checkpoint()
        boxes, reqs = [], []
        for req in plan.items:
            if req.type != LoadItemType.TENSOR:
                raise CheckpointError.make(ck.path, req.storage_index.fqn, "not-a-tensor",
                                           "a safetensors checkpoint holds tensors only, this item is bytes")
            fqn = req.storage_index.fqn
            off = [int(o) for o in req.storage_offsets]
            ln = [int(x) for x in req.lengths]
            target = planner.resolve_tensor(req).detach()
            boxes.append(Box(fqn, off, [a + b for a, b in zip(off, ln)], target))
            reqs.append((req, target))
        # drop_mapped: this reader's checkpoint hands out no views, so its mapped pages can leave RSS
        self._stats.add(read_boxes(ck, boxes, mode=self.mode, gather_below=self.gather_below, drop_mapped=True))
        for req, target in reqs:
            planner.commit_tensor(req, target)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    # ---- counters, lifetime ----
    @property
    def bytes_requested(self) -> int:
        return self._stats.requested

    def stats(self) -> dict:
        return self._stats.as_dict()

    def reset_stats(self) -> None:
        self._stats = RangeStats()

    def close(self) -> None:
        if self._ck is not None:
            self._ck.close()
            self._ck = None

    def __repr__(self):
        return f"<torchpool HFStorageReader {self.path} mode={self.mode}>"
