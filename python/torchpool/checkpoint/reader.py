"""Lazy, validated safetensors checkpoints.

    ck = torchpool.open_checkpoint("model/")          # a file, a shard directory or an index .json
    ck.keys(); ck.metadata; len(ck); "w" in ck
    w = ck["w"]                                       # zero-copy CPU view of the mapping
    half = ck.get_slice("w")[: rows // 2, :]          # reads only those bytes
    sd = ck.load(device="cpu")                        # resident when it returns
    with torchpool.open_checkpoint(path) as ck: ...

Every broken rule of the format raises ``CheckpointError`` (a ``ValueError``) naming the file, the
tensor and the rule (``err.file``, ``err.tensor``, ``err.rule``). See docs/reference/loader.md.

Note [Choosing the read path]
-----------------------------
Rationale: a cold checkpoint comes in faster through parallel ``pread``s of large pieces than by
touching a mapping or with one sequential ``read``; a warm one is mapped faster than it is copied.
And a cold load into owned memory is bound by the CPU, not the disk: every 4 KiB page of fresh
anonymous memory is faulted and zeroed, while page-cache pages are filled by the disk and only need
page-table entries (Note [Cold mapping] in csrc/loader/shard.h).  The figures, dated:
docs/measurements/2026-11-24-loader.md, "Why load maps".  Approach: ``load(mode="auto")`` on the CPU takes
"mmap" whatever the residency: the tensors are zero-copy views of the mapping; the reader threads
first queue large asynchronous reads of what is missing (``posix_fadvise(WILLNEED)``, skipped when
``mincore`` says everything is cached), then fault every piece into the mapping
(``MADV_POPULATE_READ``), so everything is resident when ``load`` returns (faster, cold, than
"direct" and "read": the same log).  ``Checkpoint(cold_cpu_path=...)`` picks
another path for loads that are less than 90 % cached.  "read": 8 reader threads ``pread`` 8 MiB
chunks into the staging pool's buffers and each chunk is copied into an owned destination tensor
(Note [Staging overlap] in csrc/loader/staging.h): the path a device other than the CPU always takes
(pages of the file mapping are never pinned or registered), kept tested on the CPU through
``mode="read"``.  "direct": the reader threads ``pread`` straight into owned destination tensors (no
staging buffer, no copy).  ``mode="mmap"`` / ``"read"`` / ``"direct"`` force a path; the path taken
is in ``ck.stats()["last_load_path"]``.  Limitation: residency is sampled once per call, so a load
that races with heavy eviction may skip the read-ahead; the populate still reads what is missing.

Note [Writes to mapped tensors]
-------------------------------
Tensors returned by ``ck[name]`` and by an "mmap" load view a private mapping of a file opened
read-only: an in-place write changes the tensor (the page is copied into this process's anonymous
memory, copy-on-write) and never the checkpoint file; torch cannot mark a tensor read-only, and a
read-only mapping would turn such a write into SIGSEGV.  Tensors from the "read" path and from
``get_slice`` are ordinary owned memory.

Note [Owned copies]
-------------------
A view of the mapping dies with the process (SIGBUS, after a message naming the file: Note [SIGBUS
message] in csrc/loader/sigbus.h) when another process truncates the file while the view is alive;
no mapping-based reader can turn that into an exception.  ``open_checkpoint(path, copy=True)`` never
hands out a view: ``ck[name]`` and CPU loads ``pread`` into owned tensors (the "direct" path), so a file
that shrinks later changes nothing, and one that shrinks during a read gives ``read-short``.  Costs:
fresh anonymous memory (page faults and zeroing, Note [Choosing the read path]) and RSS that is not
shared with the page cache.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch

from .._build import _C

__all__ = ["CheckpointError", "Checkpoint", "TensorInfo", "TensorNotFoundError", "open_checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
_RESIDENT_ENOUGH = 0.9
_PROGRESS_MIN_BYTES = 512 << 20  # a progress bar only for loads that take more than a moment
_GROUP_BYTES = 256 << 20  # one staging run per group, so the bar moves


class CheckpointError(ValueError):
    """A checkpoint breaks a rule of the safetensors format (or of the index layout).

    Attributes: ``file``, ``tensor`` ('' when the rule is about the whole file) and ``rule`` (a stable
    id such as ``offsets-gap``); the message names all three."""

    file: str = ""
    tensor: str = ""
    rule: str = ""

    @classmethod
    def make(cls, file, tensor, rule, detail) -> "CheckpointError":
        msg = str(file)
        if tensor:
            msg += f": tensor '{tensor}'"
        err = cls(f"{msg}: rule {rule}: {detail}")
        err.file, err.tensor, err.rule = str(file), tensor, rule
        return err


class TensorNotFoundError(KeyError):
    """A name the checkpoint does not hold (a KeyError, so ``except KeyError`` and ``in`` work as
    with a dict); the message lists close matches. Attributes: ``name``, ``matches``."""

    def __init__(self, name, path, matches):
        self.name, self.matches = name, list(matches)
        msg = f"{name!r} is not a tensor of {path}"
        if self.matches:
            msg += "; did you mean " + ", ".join(repr(m) for m in self.matches) + "?"
        super().__init__(msg)

    def __str__(self):  # KeyError would print repr(message)
        return str(self.args[0])


def _natural_key(p) -> list:
    """model-2-of-10 before model-10-of-10: digit runs compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(p))]


_DTYPES = {name: (bits, getattr(torch, tname) if tname and hasattr(torch, tname) else None)
           for name, bits, tname in _C.safetensors_dtypes()}


class TensorInfo(NamedTuple):
    """What the header says of one tensor (a NamedTuple: a checkpoint may hold a million of them,
    and a frozen dataclass cost ~8x the time to build; bench/bench_header.py)."""

    name: str
    dtype: str                  # safetensors dtype, e.g. "BF16"
    torch_dtype: object         # torch.dtype, or None when torch has no such dtype (F6_*)
    shape: tuple                # as in the file
    torch_shape: tuple          # as torch sees it (F4: two elements per byte, last dim halved)
    shard: int                  # index into Checkpoint.shards
    offset: int                 # absolute file offset of the data
    nbytes: int


def _torch_shape(dtype: str, shape: tuple) -> tuple:
    if dtype == "F4":
        return tuple(shape[:-1]) + (shape[-1] // 2,)
    return tuple(shape)


class Checkpoint:
    """An open checkpoint: one or more validated, mapped safetensors shards. See the module doc."""

    def __init__(self, path, *, staging_bytes: int = 64 << 20, chunk_bytes: int = 8 << 20, readers: int = 8,
                 staging_upstream: str = "host_pinned", cold_cpu_path: str = "mmap", copy: bool = False):
        self.path = Path(path)
        self.copy = bool(copy)  # Note [Owned copies]
        self._staging_args = (int(staging_bytes), int(chunk_bytes), staging_upstream)
        self.readers = int(readers)
        if cold_cpu_path not in ("mmap", "read", "direct"):
            raise ValueError(f"cold_cpu_path must be 'mmap', 'read' or 'direct', not {cold_cpu_path!r}")
        self.cold_cpu_path = cold_cpu_path
        self._staging = None
        self._views: dict[int, memoryview] = {}
        self._last_path = None
        self._mapped_view_bytes = 0
        shard_paths, weight_map, self.index_metadata = self._resolve(self.path)
        self.shards: list = []
        self._shard_paths: list[Path] = []
        self._infos: dict[str, TensorInfo] = {}
        self._metadata: dict[str, str] = {}
        for i, sp in enumerate(shard_paths):
            shard = _C.Shard(str(sp))
            self.shards.append(shard)
            self._shard_paths.append(sp)
            h = shard.header()
            self._metadata.update(h["metadata"])
            for name, dtype, _tname, shape, offset, nbytes, _bits in h["tensors"]:
                if weight_map is not None and weight_map.get(name) != sp:
                    continue  # the index decides which shard owns a name
                if name in self._infos:
                    prev = self._shard_paths[self._infos[name].shard]
                    raise CheckpointError.make(sp, name, "duplicate-name", f"the tensor is also in {prev}")
                self._infos[name] = TensorInfo(name, dtype, _DTYPES[dtype][1], tuple(shape),
                                               _torch_shape(dtype, tuple(shape)), i, offset, nbytes)
        if weight_map is not None:
            for name, shard_name in weight_map.items():
                if name not in self._infos:
                    raise CheckpointError.make(self._index_path, name, "index-missing-tensor",
                                               f"the index maps it to {shard_name.name}, which does not contain it")
            order = list(weight_map)
        else:
            order = list(self._infos)
        self._order = order

    # ---- locating the shards ----
    def _resolve(self, path: Path):
        self._index_path = None
        if path.is_dir():
            index = path / INDEX_NAME
            if not index.exists():
                found = sorted(path.glob("*.safetensors.index.json"))
                index = found[0] if len(found) == 1 else None
            if index is not None:
                return self._read_index(index)
            files = sorted((p for p in path.glob("*.safetensors") if p.is_file()), key=_natural_key)
            if not files:
                raise CheckpointError.make(path, "", "no-shards", "the directory has no *.safetensors file and no index")
            return files, None, {}
        if path.name.endswith(".json"):
            return self._read_index(path)
        if not path.exists():
            raise CheckpointError.make(path, "", "io-error", "no such file or directory")
        return [path], None, {}

    def _read_index(self, index: Path):
        self._index_path = index
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError.make(index, "", "index-json", f"cannot read the index: {e}") from None
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError.make(index, "", "index-weight-map", "'weight_map' is not an object of tensor name -> shard file")
        shards = []
        for name, shard in wm.items():
            p = Path(shard)
            if p.is_absolute() or ".." in p.parts or not shard:
                raise CheckpointError.make(index, name, "index-shard-path", f"shard {shard!r} is not a file name inside {index.parent}")
            full = index.parent / p
            if full not in shards:
                if not full.is_file():
                    raise CheckpointError.make(index, name, "index-missing-shard", f"shard file {full} does not exist")
                shards.append(full)
        meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
        shards.sort(key=_natural_key)
        return shards, {k: index.parent / v for k, v in wm.items()}, meta

    # ---- mapping protocol ----
    def _check_open(self):
        if self.shards is None:
            raise CheckpointError.make(self.path, "", "closed", "the checkpoint is closed")

    def keys(self) -> list[str]:
        return list(self._order)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name) -> bool:
        return name in self._infos

    @property
    def metadata(self) -> dict:
        """``__metadata__`` of the shards (merged), plus the index's ``metadata`` under no key clash."""
        out = dict(self._metadata)
        for k, v in self.index_metadata.items():
            out.setdefault(k, v if isinstance(v, str) else json.dumps(v))
        return out

    @property
    def shard_paths(self) -> list[Path]:
        return list(self._shard_paths)

    @property
    def nbytes(self) -> int:
        return sum(self._infos[n].nbytes for n in self._order)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise TensorNotFoundError(name, self.path, self._close_matches(name)) from None
        except TypeError:
            raise TypeError(f"tensor names are strings, not {type(name).__name__}") from None

    def _close_matches(self, name) -> list[str]:
        if not isinstance(name, str):
            return []
        names = self._order
        if len(names) > 20000:  # difflib is ~10 us a name: look only among names of a similar length
            names = [n for n in names if abs(len(n) - len(name)) <= max(3, len(name) // 4)][:20000]
        return difflib.get_close_matches(name, names, n=3, cutoff=0.75)

    def _torch_dtype(self, info: TensorInfo):
        if info.torch_dtype is None:
            raise CheckpointError.make(self._shard_paths[info.shard], info.name, "dtype-unsupported",
                                       f"dtype {info.dtype} has no torch {torch.__version__} dtype")
        return info.torch_dtype

    def _view(self, info: TensorInfo) -> torch.Tensor:
        """Zero-copy view of the mapping (Note [Writes to mapped tensors])."""
        dtype = self._torch_dtype(info)
        if info.nbytes == 0:
            return torch.empty(info.torch_shape, dtype=dtype)
        mv = self._views.get(info.shard)
        if mv is None:
            mv = self._views[info.shard] = memoryview(self.shards[info.shard])
        t = torch.frombuffer(mv[info.offset: info.offset + info.nbytes], dtype=torch.uint8)
        self._mapped_view_bytes += info.nbytes
        return t.view(dtype).reshape(info.torch_shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        self._check_open()
        info = self.info(name)
        if self.copy:  # Note [Owned copies]
            out: dict = {}
            self._read_group([info], torch.device("cpu"), out, direct=True)
            return out[info.name]
        return self._view(info)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self[name]

    def get_slice(self, name: str) -> "TensorSlice":
        self._check_open()
        return TensorSlice(self, self.info(name))

    def load_slices(self, keys: dict) -> dict[str, torch.Tensor]:
        """``{name: index}`` -> ``{name: ck.get_slice(name)[index]}``, with the runs of every slice read
        in one parallel batch (what a tensor-parallel rank wants: the readers never drain between
        tensors)."""
        self._check_open()
        plans = {name: self.get_slice(name)._plan(key) for name, key in keys.items()}
        from ._ranges import Box, read_boxes  # the box reader torchpool.distributed uses (Note [Reading a box])
        boxes = [Box(name, item[4], item[5], out) for name, (out, item, _) in plans.items() if item is not None]
        read_boxes(self, boxes, mode="pread")  # every run with pread, counted in bytes_read
        return {name: TensorSlice._finish(out, post) for name, (out, _, post) in plans.items()}

    # ---- loading ----
    def staging_pool(self):
        if self._staging is None:
            sb, cb, up = self._staging_args
            self._staging = _C.StagingPool(sb, cb, up)
        return self._staging

    def resident_fraction(self, names: Iterable[str] | None = None) -> float:
        infos = [self.info(n) for n in (self._order if names is None else names)]
        total = sum(i.nbytes for i in infos)
        if total == 0:
            return 1.0
        got = sum(self.shards[i.shard].resident_fraction(i.offset, i.nbytes) * i.nbytes for i in infos if i.nbytes)
        return got / total

    def load(self, names: Iterable[str] | None = None, device="cpu", dtype=None, *, mode: str = "auto",
             progress: bool | None = None) -> dict[str, torch.Tensor]:
        """Tensors by name, resident in memory when this returns (Note [Choosing the read path])."""
        self._check_open()
        names = list(self._order if names is None else names)
        infos = [self.info(n) for n in names]
        for i in infos:
            self._torch_dtype(i)
        device = torch.device(device)
        if mode not in ("auto", "mmap", "read", "direct"):
            raise ValueError(f"mode must be 'auto', 'mmap', 'read' or 'direct', not {mode!r}")
        if self.copy and mode == "mmap":
            raise ValueError("mode='mmap' returns views of the file, but this checkpoint was opened with copy=True "
                             "(owned memory only: Note [Owned copies]); use mode='direct' or 'read'")
        if device.type != "cpu":
            path = "read"
        elif self.copy and mode == "auto":
            path, frac = "direct", 0.0
        elif mode == "auto":
            frac = self.resident_fraction(names)
            path = "mmap" if frac >= _RESIDENT_ENOUGH else self.cold_cpu_path
        else:
            path = mode
            frac = self.resident_fraction(names) if path == "mmap" else 0.0
        self._last_path = path
        total = sum(i.nbytes for i in infos)
        bar = self._progress(total, progress)
        out: dict[str, torch.Tensor] = {}
        try:
            if path == "mmap":
                for group in (_groups(infos) if bar is not None else [infos]):
                    # Note [Cold mapping]: read ahead what is missing, map it all with the reader threads
                    ops = [(self.shards[i.shard], i.offset, i.nbytes, 0, i.name) for i in group if i.nbytes]
                    _C.populate(ops, self.readers, frac < 1.0, self._staging_args[1])
                    for i in group:
                        out[i.name] = self._view(i)
                    if bar is not None:
                        bar.update(sum(i.nbytes for i in group))
            else:
                # one read for everything unless a bar wants progress (the readers drain between groups)
                for group in (_groups(infos) if bar is not None else [infos]):
                    self._read_group(group, device, out, direct=path == "direct")
                    if bar is not None:
                        bar.update(sum(i.nbytes for i in group))
        finally:
            if bar is not None:
                bar.close()
        if dtype is not None:
            out = {k: (v if v.dtype == dtype else v.to(dtype)) for k, v in out.items()}
        return out

    def _read_group(self, infos: list[TensorInfo], device: torch.device, out: dict, direct: bool = False):
        dsts = []
        ops = []
        for i in infos:
            t = torch.empty(i.torch_shape, dtype=i.torch_dtype, device=device)
            out[i.name] = t
            if i.nbytes:
                dsts.append(t)
                ops.append((self.shards[i.shard], i.offset, i.nbytes, t.data_ptr() if device.type == "cpu" else 0, i.name))
        if not ops:
            return
        if direct:  # "direct": pread straight into the destinations, no staging buffer (CPU only)
            _C.read_direct(ops, self.readers, self._staging_args[1])
            return
        pool = self.staging_pool()
        if device.type == "cpu":
            pool.read(ops, self.readers)
            return
        flat = [d.view(-1).view(torch.uint8) if d.dim() else d.reshape(1).view(torch.uint8) for d in dsts]

        def consume(k, off, mv):
            src = torch.frombuffer(mv, dtype=torch.uint8)
            flat[k][off: off + src.numel()].copy_(src)  # synchronous: the buffer is reused right after
        pool.read_with(ops, self.readers, consume)

    def _progress(self, total: int, progress):
        if progress is False or total < _PROGRESS_MIN_BYTES:
            return None
        if progress is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {self.path.name}", delay=0.5, leave=False)

    # ---- stats, lifetime ----
    def stats(self) -> dict:
        """Bytes this process read from the files (pread), view bytes handed out, the path of the last
        load and the staging pool's counters."""
        d = {
            "bytes_read": sum(s.bytes_read for s in self.shards or []),
            "preads": sum(s.preads for s in self.shards or []),
            "mapped_view_bytes": self._mapped_view_bytes,
            "last_load_path": self._last_path,
        }
        d["staging"] = self._staging.stats() if self._staging is not None else None
        return d

    def reset_stats(self):
        for s in self.shards or []:
            s.reset_counters()
        self._mapped_view_bytes = 0

    def close(self):
        """Drops this object's references to the mappings; tensors made from them keep them alive."""
        self._views.clear()
        self.shards = None
        if self._staging is not None:
            self._staging.release_buffers()
            self._staging = None

    @property
    def closed(self) -> bool:
        return self.shards is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        n = len(self._shard_paths)
        return f"<torchpool Checkpoint {self.path} shards={n} tensors={len(self)} bytes={self.nbytes}>"


def _groups(infos: list[TensorInfo]):
    group, size = [], 0
    for i in infos:
        group.append(i)
        size += i.nbytes
        if size >= _GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


class TensorSlice:
    """``ck.get_slice(name)[...]``: reads only the bytes of the slice (each contiguous run once)."""

    def __init__(self, ck: Checkpoint, info: TensorInfo):
        self._ck, self._info = ck, info
        self.dtype = ck._torch_dtype(info)
        self.shape = info.torch_shape

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return self._info.dtype

    def __getitem__(self, key) -> torch.Tensor:
        out, item, post = self._plan(key)
        if item is not None:
            self._ck.shards[self._info.shard].read_slice(*item[1:], self._ck.readers)
        return self._finish(out, post)

    @staticmethod
    def _finish(out, post):
        res = out[tuple(post)] if post else out
        if any(isinstance(p, slice) and p.step != 1 for p in post):
            res = res.contiguous()
        return res

    _KINDS = "ints, slices with positive steps, ... and 1-D lists (or integer tensors) of ints"

    def _index_int(self, k) -> int:
        import operator

        if isinstance(k, torch.Tensor) and k.dim() == 0 and not k.is_floating_point() and k.dtype != torch.bool:
            return int(k)
        try:
            return operator.index(k)
        except TypeError:
            raise IndexError(f"get_slice of {self._info.name!r}: {type(k).__name__} index {k!r} is not supported; "
                             f"indices are {self._KINDS}") from None

    def _index_list(self, k, n):
        """The normalised indices of a list / range / 1-D integer tensor index, else None."""
        if isinstance(k, torch.Tensor):
            if k.dim() == 0:
                return None
            if k.dtype == torch.bool or k.is_floating_point() or k.is_complex() or k.dim() != 1:
                raise IndexError(f"get_slice of {self._info.name!r}: a {k.dim()}-D {k.dtype} tensor index is not "
                                 f"supported; indices are {self._KINDS}")
            k = k.tolist()
        elif not isinstance(k, (list, range)):
            return None
        out = []
        for i in k:
            if isinstance(i, bool) or isinstance(i, (list, tuple)):
                raise IndexError(f"get_slice of {self._info.name!r}: list indices must be ints, not "
                                 f"{type(i).__name__} (indices are {self._KINDS})")
            i = self._index_int(i)
            if i < -n or i >= n:
                raise IndexError(f"index {i} is out of bounds for dimension of size {n} of {self._info.name!r}")
            out.append(i % n)
        return out

    def _plan(self, key):
        """(output tensor, read item or None, post-indexing) for a key."""
        ck, info = self._ck, self._info
        ck._check_open()
        shape = self.shape
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            fill = len(shape) - (len(key) - 1)
            key = key[:i] + (slice(None),) * fill + key[i + 1:]
        if len(key) > len(shape):
            raise IndexError(f"too many indices for tensor {info.name!r} of dimension {len(shape)}")
        key = key + (slice(None),) * (len(shape) - len(key))
        start, stop, post = [], [], []
        for k, n in zip(key, shape):
            if isinstance(k, slice):
                a, b, step = k.indices(n)
                if step <= 0:
                    raise IndexError("get_slice supports positive steps only")
                b = max(a, b)
                # Read the bounding range [a, b) and take every step-th element in memory.
                start.append(a)
                stop.append(b)
                post.append(slice(None, None, step))
            elif (idxs := self._index_list(k, n)) is not None:
                # A list of indices (advanced indexing): read their bounding range, index it in memory
                # with the same key, shifted; the result has torch's shape for t[key].
                a = min(idxs, default=0)
                b = max(idxs, default=-1) + 1
                start.append(a)
                stop.append(max(a, b))
                post.append(torch.tensor([i - a for i in idxs], dtype=torch.long))
            else:
                idx = self._index_int(k)
                if idx < -n or idx >= n:
                    raise IndexError(f"index {idx} is out of bounds for dimension of size {n} of {info.name!r}")
                idx %= n
                start.append(idx)
                stop.append(idx + 1)
                post.append(0)
        out = torch.empty([b - a for a, b in zip(start, stop)], dtype=self.dtype)
        item = None
        if out.numel():
            item = (ck.shards[info.shard], info.name, self.dtype.itemsize, list(shape), start, stop, out.data_ptr())
        return out, item, post


def open_checkpoint(path, **options) -> Checkpoint:
    """Open a safetensors checkpoint: a file, a directory of shards (with or without
    ``model.safetensors.index.json``) or an index file. Options: staging_bytes (64 MiB),
    chunk_bytes (8 MiB), readers (8), staging_upstream ("host_pinned"), cold_cpu_path ("mmap", or
    "read" / "direct" for owned memory: Note [Choosing the read path]), copy (False; True: every
    tensor handed out is owned memory, never a view of the file, for files that may be truncated or
    rewritten while the process runs: Note [Owned copies])."""
    return Checkpoint(os.fspath(path), **options)
