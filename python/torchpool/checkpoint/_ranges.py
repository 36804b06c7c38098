"""Reading boxes of checkpoint tensors: the one engine behind ``Checkpoint.load_slices`` and
``torchpool.distributed.HFStorageReader``.

A *box* is a tensor's region ``[start_d, stop_d)`` per dimension (what a tensor-parallel rank or a
DCP ``ReadItem`` asks for) and a destination tensor of that shape, on any device, of any dtype and
strides.  ``read_boxes`` reads only the box's byte ranges and fills the destination.

Note [Reading a box]
--------------------
Rationale: a rank of a sharded model wants, for each tensor, a row block (``Shard(0)``: one
contiguous byte range), a column block (``Shard(1)``: one range per row, each a fraction of a row),
or the whole tensor (``Replicate``).  Row blocks and whole tensors are large ranges: ``pread`` into
the destination with the reader threads (8 MiB pieces, several files at once) is as fast as the disk
and reads each byte once.  A column block of a 2048-wide bf16 matrix is 2048 ranges of 2 KiB: one
``pread`` each costs a syscall per 2 KiB and the disk reads whole pages anyway (its neighbours'
columns are on the same pages).  And when the page cache already holds the data, copying out of the
mapping skips a syscall per piece.
Approach: each box takes one of three paths.
- "pread": CPU destination, contiguous, same dtype as the file, runs of at least ``gather_below``
  bytes (a row block is one run): the runs are read straight into the destination by the reader
  threads (``_C.read_slices``), all boxes of a call in one parallel batch.
- "map": everything else on the CPU (small strided runs, a different dtype, a non-contiguous
  destination, or data already cached): the box's bounding byte range is faulted into the private
  mapping by the reader threads in large pieces (read ahead with ``posix_fadvise(WILLNEED)`` when
  less than all of it is cached: Note [Cold mapping] in csrc/loader/shard.h), then one strided
  ``copy_`` gathers the box out of the mapping into the destination, converting the dtype in the
  same pass.  A cached box skips the populate.
- "staged": a destination on a device: the runs go through the bounded staging pool (Note [Staging
  overlap] in csrc/loader/staging.h) and each staged chunk is copied (and converted) into the
  destination, never through the file mapping (its pages are never pinned).  Small strided runs on a
  device are gathered on the CPU first ("map" into a host tensor), then copied over.
Counters: ``requested`` is the bytes of the boxes themselves (what a rank asked the storage for: the
same for every path); ``pread`` is what the reader threads read with ``pread``; ``mapped`` is the
bounding bytes faulted through the mapping (a column block's bounding range holds the other ranks'
columns too; on one host they share those pages, see docs/reference/distributed.md).
Limitation: residency is sampled once per box (``mincore``), as in ``Checkpoint.load``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._build import _C

__all__ = ["Box", "RangeStats", "read_boxes", "PATHS"]

PATHS = ("auto", "pread", "map", "staged")
GATHER_BELOW = 64 << 10  # runs shorter than this are gathered from the mapping
_RESIDENT_ENOUGH = 0.9


@dataclass
class Box:
    name: str
    start: list  # per dimension of the tensor's torch shape
    stop: list
    target: torch.Tensor  # shape == stop - start


@dataclass
class RangeStats:
    requested: int = 0
    pread: int = 0
    mapped: int = 0
    boxes: dict = field(default_factory=lambda: {"pread": 0, "map": 0, "staged": 0})

    def add(self, other: "RangeStats"):
        self.requested += other.requested
        self.pread += other.pread
        self.mapped += other.mapped
        for k, v in other.boxes.items():
            self.boxes[k] = self.boxes.get(k, 0) + v

    def as_dict(self) -> dict:
        return {"bytes_requested": self.requested, "bytes_pread": self.pread, "bytes_mapped": self.mapped,
                "boxes": dict(self.boxes)}


def _geometry(shape, start, stop, elem):
    """(number of runs, bytes per run, file byte offset of the first run relative to the tensor,
    bounding byte length): the box's contiguous runs in a C-contiguous tensor."""
    nd = len(shape)
    if nd == 0:
        return 1, elem, 0, elem
    lengths = [b - a for a, b in zip(start, stop)]
    # the last dimension the box does not cover fully: runs are contiguous below it
    d = nd - 1
    while d > 0 and start[d] == 0 and stop[d] == shape[d]:
        d -= 1
    inner = elem
    for k in range(d + 1, nd):
        inner *= shape[k]
    run = lengths[d] * inner
    nruns = 1
    for k in range(d):
        nruns *= lengths[k]
    strides = [0] * nd
    acc = elem
    for k in range(nd - 1, -1, -1):
        strides[k] = acc
        acc *= shape[k]
    first = sum(a * s for a, s in zip(start, strides))
    last = sum((b - 1) * s for b, s in zip(stop, strides)) + elem  # end of the last element
    return nruns, run, first, last - first


def read_boxes(ck, boxes: list[Box], *, mode: str = "auto", gather_below: int = GATHER_BELOW,
               readers: int | None = None, drop_mapped: bool = False) -> RangeStats:
    """Fill every box's target from the checkpoint (Note [Reading a box]); returns the byte counters.

    ``drop_mapped``: after a box is copied out of the mapping, drop this process's page-table entries
    of its whole pages (RSS; the page cache keeps the data). Only for a checkpoint object that hands
    out no views (a write to a view copies its page privately, and dropping it would undo the write)."""
    if mode not in PATHS:
        raise ValueError(f"mode must be one of {PATHS}, not {mode!r}")
    ck._check_open()
    readers = int(readers or ck.readers)
    st = RangeStats()
    pread_items, map_items, staged = [], [], []
    for box in boxes:
        info = ck.info(box.name)
        dtype = ck._torch_dtype(info)
        shape = list(info.torch_shape)
        start, stop = [int(a) for a in box.start], [int(b) for b in box.stop]
        if len(start) != len(shape) or len(stop) != len(shape) or any(
                not (0 <= a <= b <= n) for a, b, n in zip(start, stop, shape)):
            raise ValueError(f"box [{start}, {stop}) is outside tensor {box.name!r} of shape {tuple(shape)}")
        lengths = [b - a for a, b in zip(start, stop)]
        t = box.target
        if list(t.shape) != lengths:
            raise ValueError(f"tensor {box.name!r}: the destination has shape {tuple(t.shape)} but the box "
                             f"[{start}, {stop}) of the checkpoint's {tuple(shape)} has {tuple(lengths)}")
        if t.numel() == 0:
            continue
        elem = dtype.itemsize
        nruns, run, first, bound = _geometry(shape, start, stop, elem)
        st.requested += nruns * run
        shard = ck.shards[info.shard]
        if t.device.type != "cpu":
            path = "staged" if mode in ("auto", "staged") and (nruns == 1 or run >= gather_below) else "map"
        elif mode == "auto":
            if shard.resident_fraction(info.offset + first, bound) >= _RESIDENT_ENOUGH:
                path = "map"
            elif t.dtype == dtype and t.is_contiguous() and (nruns == 1 or run >= gather_below):
                path = "pread"
            else:
                path = "map"
        elif mode == "pread" and not (t.dtype == dtype and t.is_contiguous()):
            path = "map"  # a pread cannot convert or scatter; the mapping's copy_ does both
        else:
            path = mode
        st.boxes[path] += 1
        item = (info, dtype, shape, start, stop, nruns, run, first, bound, t)
        {"pread": pread_items, "map": map_items, "staged": staged}[path].append(item)

    if pread_items:
        items = [(ck.shards[i.shard], i.name, dt.itemsize, shape, a, b, t.data_ptr())
                 for i, dt, shape, a, b, _n, _r, _f, _bd, t in pread_items]
        st.pread += _C.read_slices(items, readers)
    if map_items:
        _read_mapped(ck, map_items, readers, st, drop_mapped)
    if staged:
        _read_staged(ck, staged, readers, gather_below, st)
    return st


def _read_mapped(ck, items, readers, st: RangeStats, drop_mapped: bool):
    ops = []
    for info, _dt, _shape, _a, _b, _n, _r, first, bound, t in items:
        ops.append((ck.shards[info.shard], info.offset + first, bound, 0, info.name))
        st.mapped += bound
    fracs = [op[0].resident_fraction(op[1], op[2]) for op in ops]
    cold = [op for op, f in zip(ops, fracs) if f < 1.0]
    if cold:  # Note [Cold mapping]: large asynchronous reads of what is missing, faulted in by the readers
        _C.populate(cold, readers, True, ck._staging_args[1])
    for info, _dt, _shape, a, b, _n, _r, _f, _bd, t in items:
        src = ck._view(info)[tuple(slice(x, y) for x, y in zip(a, b))]
        t.copy_(src)  # the gather, and the dtype conversion in the same pass
        if drop_mapped:
            ck.shards[info.shard].drop_mapped(info.offset + _f, _bd)


def _read_staged(ck, items, readers, gather_below, st: RangeStats):
    """Device destinations through the bounded staging pool (Note [Staging overlap])."""
    ops, dests = [], []  # dests[k]: (flat typed destination, element offset of op k, file dtype)
    finish = []
    for info, dt, shape, a, b, nruns, run, first, bound, t in items:
        dst = t if t.is_contiguous() else torch.empty(t.shape, dtype=t.dtype, device=t.device)
        if not t.is_contiguous():
            finish.append((t, dst))
        flat = dst.view(-1) if dst.dim() else dst.reshape(1)
        shard = ck.shards[info.shard]
        for off, ln, dst_off in _runs(shape, dt.itemsize, info.offset, a, b, nruns, run, first):
            ops.append((shard, off, ln, 0, info.name))
            dests.append((flat, dst_off // dt.itemsize, dt))
    pool = ck.staging_pool()
    before = pool.stats()["bytes_staged"]

    def consume(k, off, mv):
        flat, e0, dt = dests[k]
        src = torch.frombuffer(mv, dtype=torch.uint8).view(dt)
        s = e0 + off // dt.itemsize
        flat[s: s + src.numel()].copy_(src)  # synchronous: the buffer is reused right after

    if ops:
        pool.read_with(ops, readers, consume)
    st.pread += pool.stats()["bytes_staged"] - before
    for t, dst in finish:
        t.copy_(dst)


def _runs(shape, elem, base, start, stop, nruns, run, first):
    if nruns == 1:
        return [(base + first, run, 0)]
    return _C.slice_runs([int(x) for x in shape], elem, base, start, stop)
