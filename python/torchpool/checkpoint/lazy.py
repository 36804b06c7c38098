"""Models larger than memory: parameters bound to a checkpoint, real only while their module runs.

    with torchpool.init_empty_weights():              # parameters on meta, buffers real
        model = MyModel(config)
    model = torchpool.load_lazily(model, "ckpt/", budget_bytes=1 << 30)
    out = model(x)                                    # each module's weights come in when it runs
    torchpool.lazy.stats(model)                       # resident / peak bytes, loads, evictions

Note [LRU budget]
-----------------
Rationale: a forward pass touches modules in order and never needs all weights at once, so a
checkpoint larger than memory can run if weights come in when a module starts and leave once the
budget needs room.  Approach: every parameter and persistent buffer named in the model's state dict
is bound to the checkpoint tensor of the same name (or the name ``key_map`` gives it) and replaced by
an unloaded placeholder (Note [Unloaded placeholders]).  The unit of loading is a group of modules
that share tensors (Note [Tied weights]); a forward pre-hook on each module of a unit loads the
unit's tensors (``Checkpoint.load``: zero-copy views of the mapping, cold pieces read ahead in
parallel, Note [Choosing the read path] in reader.py) and moves the unit to the most-recent end
of an LRU.  Before loading, least recently used units are evicted until resident bytes + the unit's
bytes fit in ``budget_bytes``; evicting puts the placeholders back, and for mapped views also drops
this process's page-table entries for those pages (``MADV_DONTNEED``), so RSS follows the budget (the
page cache keeps the data; the kernel reclaims it as it needs).  Units with a module whose forward is
still running (kept by pre/post hooks with ``always_call``) are never evicted.  Resident bytes are
counted from the tensors actually held.
Limitations: a unit larger than the budget is still loaded (the budget is exceeded by it alone and
``over_budget`` counts it); a parameter used outside its own module's forward (weights read by a
parent) raises (Note [Unloaded placeholders]) until it is loaded with ``materialize(model)``; evicted
weights come back from the checkpoint, so in-place changes to lazily bound weights do not survive
eviction (this is for inference).

Note [Tied weights]
-------------------
Rationale: tied models (Llama with ``tie_word_embeddings``, GPT-2, T5/BART shared embeddings) hold
one Parameter object under several names, and the checkpoint stores it under one of them only.
Binding each name on its own leaves the others on meta, and loading each on its own unties them
(two copies, the second never loaded).  Approach: names are grouped by tensor identity
(``state_dict(keep_vars=True)`` lists a shared tensor under every name), plus the ties passed in
``tied`` (``{target: source}``, what transformers declares); each group is bound once, to the first
of its names the checkpoint stores, and every (module, attribute) place of the group receives the
same loaded Parameter and the same placeholder on eviction.  Modules that share a tensor form one
unit of the LRU (they load and evict together), so a tie can never be half resident.  When the
checkpoint stores several names of one group (``.bin`` conversions), the others are compared with
the bound one on first load and a difference raises: the model ties what the checkpoint does not.

Note [Unloaded placeholders]
----------------------------
Rationale: in torch 2.13 ``F.linear``/``F.embedding`` with one CPU and one meta operand return
uninitialised memory instead of raising, so a weight left on meta (or read outside its module's
forward while evicted) gives garbage with no error.  Approach: a bound tensor that is not resident
is an ``_Unloaded`` meta tensor whose ``__torch_function__`` answers metadata (shape, dtype,
requires_grad, ...) and raises, naming the checkpoint tensor, on every computation.  Its ``device``
is the device it will be loaded to, so ``model.device`` / ``next(model.parameters()).device`` (which
``generate`` and user code use to place inputs) say where inputs belong.  Tensors that are on meta
but bound to nothing (non-persistent buffers of a model built under ``torch.device("meta")``) are
refused before anything is bound, with every name listed (or rebuilt by ``fix_meta``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import threading
import warnings
import weakref

import torch

from .reader import Checkpoint, CheckpointError, open_checkpoint

__all__ = ["load_lazily", "load_into", "init_empty_weights", "stats", "materialize", "LazyBinding"]

log = logging.getLogger("torchpool.lazy")

HOW_TO_BUILD = ("build the model with `with torchpool.init_empty_weights(): model = ...` (parameters on meta, "
                "buffers real) instead of `with torch.device(\"meta\")`, or with transformers use "
                "torchpool.from_pretrained(...)")


# ---------------------------------------------------------------------------------------------
# Building a model with parameters on meta and buffers real
# ---------------------------------------------------------------------------------------------

_patch_lock = threading.RLock()


@contextlib.contextmanager
def init_empty_weights():
    """Inside this context, modules register their parameters on the meta device (no memory) while
    buffers (position ids, rotary frequencies, masks: computed in ``__init__`` and not stored in
    checkpoints) stay real. What ``accelerate.init_empty_weights(include_buffers=False)`` does; each
    parameter exists in memory only between its creation and its registration. Not thread-safe with
    other threads building modules at the same time (it patches ``nn.Module.register_parameter``)."""
    with _patch_lock:
        original = torch.nn.Module.register_parameter

        def register_parameter(module, name, param):
            original(module, name, param)
            p = module._parameters.get(name)
            if p is not None and not isinstance(p, _Unloaded) and p.device.type != "meta":
                kwargs = dict(p.__dict__)
                kwargs.pop("_is_param", None)
                new = type(p)(p.to("meta"), requires_grad=p.requires_grad) if type(p) is torch.nn.Parameter \
                    else torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
                new.__dict__.update(kwargs)
                module._parameters[name] = new

        torch.nn.Module.register_parameter = register_parameter
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = original


# ---------------------------------------------------------------------------------------------
# Note [Unloaded placeholders]
# ---------------------------------------------------------------------------------------------

_ALLOWED_METHODS = {
    torch.Tensor.detach, torch.Tensor.requires_grad_, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel,
    torch.Tensor.nelement, torch.Tensor.element_size, torch.Tensor.is_floating_point, torch.Tensor.is_complex,
    torch.Tensor.__hash__, torch.Tensor.__len__, torch.Tensor.ndimension, torch.Tensor.stride,
    torch.Tensor.is_contiguous, torch.Tensor.type, torch.Tensor.get_device,
}
_LIED = {"device", "is_meta", "is_cpu", "is_cuda"}


class _Unloaded(torch.Tensor):
    """A bound tensor that is not resident (Note [Unloaded placeholders])."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0] if args else None
        if type(func).__name__ == "method-wrapper" and getattr(func, "__name__", "") == "__get__":
            attr = getattr(func.__self__, "__name__", "")
            if isinstance(self, _Unloaded) and attr in _LIED:
                dev = self.__dict__.get("_tp_device", torch.device("cpu"))
                return {"device": dev, "is_meta": dev.type == "meta", "is_cpu": dev.type == "cpu",
                        "is_cuda": dev.type == "cuda"}[attr]
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            if attr == "data" and isinstance(self, _Unloaded) and isinstance(out, torch.Tensor):
                if type(out) is not _Unloaded:  # a plain meta tensor would compute garbage: keep the guard
                    out = torch.Tensor._make_subclass(_Unloaded, out, False)
                out.__dict__.update({k: v for k, v in self.__dict__.items() if k.startswith("_tp_")})
            return out
        if func in _ALLOWED_METHODS:
            if func is torch.Tensor.type and (len(args) > 1 or kwargs):
                pass  # a conversion: refused below
            elif func is torch.Tensor.get_device:
                dev = self.__dict__.get("_tp_device", torch.device("cpu"))
                return -1 if dev.type == "cpu" else (dev.index or 0)
            else:
                with torch._C.DisableTorchFunctionSubclass():
                    out = func(*args, **kwargs)
                if func is torch.Tensor.detach and type(out) is torch.Tensor:
                    out = torch.Tensor._make_subclass(_Unloaded, out, False)
                if isinstance(out, _Unloaded) and isinstance(self, _Unloaded):
                    out.__dict__.update({k: v for k, v in self.__dict__.items() if k.startswith("_tp_")})
                return out
        if func is torch.Tensor.__repr__ or func is torch.Tensor.__format__:
            return cls._describe(self)
        names = sorted({a.__dict__.get("_tp_key", "?") for a in _flat(args, kwargs) if isinstance(a, _Unloaded)})
        fname = getattr(func, "__name__", repr(func))
        raise RuntimeError(
            f"torchpool: {fname}() on lazily bound tensor(s) {', '.join(repr(n) for n in names)} that are not loaded: "
            "a lazily bound weight is loaded only while a module that owns it runs its forward, and this one was used "
            "outside it (read by another module, or after the model was closed). Load it first with "
            "torchpool.lazy.materialize(model, [module]) (it then counts against the budget like any other), or "
            "load the model with torchpool.load_into(model, path).")

    @staticmethod
    def _describe(t):
        d = t.__dict__
        return (f"UnloadedTensor(key={d.get('_tp_key', '?')!r}, shape={tuple(t.shape)}, dtype={t.dtype}, "
                f"device={d.get('_tp_device', 'cpu')}, not loaded)")


def _flat(args, kwargs):
    out = []
    stack = list(args) + list(kwargs.values())
    while stack:
        a = stack.pop()
        if isinstance(a, (list, tuple)):
            stack.extend(a)
        elif isinstance(a, dict):
            stack.extend(a.values())
        else:
            out.append(a)
    return out


def _placeholder(shape, dtype, device, key, is_param, requires_grad):
    t = torch.Tensor._make_subclass(_Unloaded, torch.empty(shape, dtype=dtype, device="meta"), False)
    if is_param:
        t = torch.nn.Parameter(t, requires_grad=requires_grad and dtype.is_floating_point)
    t.__dict__["_tp_key"] = key
    t.__dict__["_tp_device"] = device
    return t


def is_unloaded(t) -> bool:
    """True for a lazily bound tensor that is not resident."""
    return isinstance(t, _Unloaded)


# ---------------------------------------------------------------------------------------------
# Binding
# ---------------------------------------------------------------------------------------------

class _Tensor:
    """One checkpoint tensor bound to one or more places of the model (Note [Tied weights])."""
    __slots__ = ("key", "names", "places", "is_param", "requires_grad", "dtype", "shape", "also_stored", "nbytes")

    def __init__(self, key, names, places, is_param, requires_grad, dtype, shape):
        self.key, self.names, self.places = key, names, places
        self.is_param, self.requires_grad, self.dtype, self.shape = is_param, requires_grad, dtype, shape
        self.also_stored = []  # other checkpoint names of the same group: compared with key on first load
        n = 1
        for d in shape:
            n *= d
        self.nbytes = n * dtype.itemsize


class _Unit:
    """Modules that share bound tensors: loaded and evicted together (Note [Tied weights])."""
    __slots__ = ("modules", "tensors", "nbytes", "resident", "active", "views")

    def __init__(self):
        self.modules = []
        self.tensors: list[_Tensor] = []
        self.nbytes = 0
        self.resident = False
        self.active = 0
        self.views = []  # (shard, offset, nbytes) of mapped views held


class LazyBinding:
    """The state behind a lazily loaded model (``torchpool.lazy.stats(model)`` reads it).

    Reports: ``missing_keys`` (model names the checkpoint lacks, left as built: declared missing or
    ``strict=False``), ``unexpected_keys`` (checkpoint names not used, ``strict=False``),
    ``ignored_keys`` (checkpoint names skipped because the model declares them ignorable or they are
    legacy copies of its non-persistent buffers), ``tied`` (each bound checkpoint name -> the model
    names sharing it)."""

    def __init__(self, ck: Checkpoint, device, budget_bytes, dtype, owns_checkpoint):
        self.ck = ck
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.owns_checkpoint = owns_checkpoint
        self.units: list[_Unit] = []
        self.unit_of: dict[int, _Unit] = {}
        self.lru: collections.OrderedDict[int, _Unit] = collections.OrderedDict()
        self.handles = []
        self.mode = "auto"
        self.verified: set[str] = set()
        self.read_ahead_done = False
        self.missing_keys: list[str] = []
        self.unexpected_keys: list[str] = []
        self.ignored_keys: list[str] = []
        self.tied: dict[str, list[str]] = {}
        self.counters = dict(resident_bytes=0, peak_resident_bytes=0, loads=0, evictions=0, bytes_loaded=0, over_budget=0)

    @property
    def bound(self):
        return self.unit_of

    def _read_ahead(self):
        """No budget: every bound tensor will be resident, so on the first load the kernel is asked to
        read the bound byte ranges of every shard ahead (``posix_fadvise(WILLNEED)``, asynchronous):
        later modules find their pages cached instead of each faulting its own cold reads one after
        another (the first token of a cold model)."""
        self.read_ahead_done = True
        if not hasattr(os, "posix_fadvise") or self.device.type != "cpu":
            return
        ranges: dict[int, list[int]] = {}
        for u in self.units:
            for t in u.tensors:
                i = self.ck.info(t.key)
                lo_hi = ranges.setdefault(i.shard, [i.offset, i.offset + i.nbytes])
                lo_hi[0], lo_hi[1] = min(lo_hi[0], i.offset), max(lo_hi[1], i.offset + i.nbytes)
        for shard, (lo, hi) in ranges.items():
            try:
                fd = os.open(self.ck.shard_paths[shard], os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    # ---- hooks ----
    def _pre(self, module, args):
        u = self.unit_of[id(module)]
        u.active += 1
        try:
            if self.budget_bytes is None and not self.read_ahead_done:
                self._read_ahead()
            if not u.resident:
                self._make_room(u)
                self._load(u)
        except BaseException:
            u.active -= 1
            raise
        self.lru.move_to_end(id(u))

    def _post(self, module, args, output):
        u = self.unit_of[id(module)]
        u.active = max(0, u.active - 1)

    def _make_room(self, u: _Unit):
        if self.budget_bytes is None:
            return
        c = self.counters
        for key in list(self.lru):
            if c["resident_bytes"] + u.nbytes <= self.budget_bytes:
                break
            other = self.lru[key]
            if other is u or other.active or not other.resident:
                continue
            self._evict(other)
        if c["resident_bytes"] + u.nbytes > self.budget_bytes:
            c["over_budget"] += 1

    def _load(self, u: _Unit, loaded=None, mapped=False):
        keys = [t.key for t in u.tensors]
        check = [(t, o) for t in u.tensors for o in t.also_stored if o not in self.verified]
        if loaded is None:
            keys_all = keys + [o for _, o in check]
            loaded = self.ck.load(keys_all, device=self.device, mode=self.mode, progress=False)
            mapped = self.ck.stats()["last_load_path"] == "mmap"
        for t, other in check:
            if not torch.equal(loaded[t.key], loaded[other]):
                raise RuntimeError(
                    f"torchpool: the model ties {', '.join(t.names)} (one tensor), but the checkpoint stores "
                    f"{t.key!r} and {other!r} with different values; build the model untied (for transformers: "
                    "tie_word_embeddings=False)")
            self.verified.add(other)
        held = 0
        views = []
        for t in u.tensors:
            v = loaded[t.key]
            if v.dtype != t.dtype:
                v = v.to(t.dtype)
            elif mapped:
                i = self.ck.info(t.key)
                views.append((self.ck.shards[i.shard], i.offset, i.nbytes))
            held += v.numel() * v.element_size()
            new = torch.nn.Parameter(v, requires_grad=t.requires_grad and v.is_floating_point()) if t.is_param else v
            for module, attr in t.places:
                (module._parameters if t.is_param else module._buffers)[attr] = new
        del loaded
        u.views = views
        u.nbytes = held
        u.resident = True
        c = self.counters
        c["loads"] += 1
        c["bytes_loaded"] += held
        c["resident_bytes"] += held
        c["peak_resident_bytes"] = max(c["peak_resident_bytes"], c["resident_bytes"])

    def _unload(self, u: _Unit):
        for t in u.tensors:
            ph = _placeholder(t.shape, t.dtype, self.device, t.key, t.is_param, t.requires_grad)
            for module, attr in t.places:
                (module._parameters if t.is_param else module._buffers)[attr] = ph
        for shard, offset, nbytes in u.views:
            shard.drop_mapped(offset, nbytes)
        u.views = []

    def _evict(self, u: _Unit):
        self._unload(u)
        u.resident = False
        self.counters["resident_bytes"] -= u.nbytes
        self.counters["evictions"] += 1

    # ---- API ----
    def materialize(self, modules=None):
        """Loads the bound tensors of the given modules (default: all) without running them; they
        count against the budget like any other."""
        ids = None if modules is None else {id(m) for m in modules}
        for u in self.units:
            if ids is None or any(id(m) in ids for m in u.modules):
                if not u.resident:
                    self._make_room(u)
                    self._load(u)
                self.lru.move_to_end(id(u))

    def evict_all(self):
        for u in self.units:
            if u.resident and not u.active:
                self._evict(u)

    def stats(self) -> dict:
        d = dict(self.counters)
        d["budget_bytes"] = self.budget_bytes
        d["bound_modules"] = len(self.unit_of)
        d["bound_units"] = len(self.units)
        d["bound_bytes"] = sum(t.nbytes for u in self.units for t in u.tensors)
        d["checkpoint"] = self.ck.stats()
        return d

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.owns_checkpoint:
            self.ck.close()


_BINDINGS: "weakref.WeakKeyDictionary[torch.nn.Module, LazyBinding]" = weakref.WeakKeyDictionary()


def _mismatch_report(model, missing, unexpected, mismatches) -> str:
    lines = []
    if unexpected:
        lines.append("Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
    if missing:
        lines.append("Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
    lines.extend(mismatches)
    return "Error(s) in loading state_dict for {}:\n\t{}".format(type(model).__name__, "\n\t".join(lines))


def _regex(patterns):
    patterns = [p for p in (patterns or ()) if p]
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def _place(model, name):
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def _non_persistent(model) -> dict[str, torch.Tensor]:
    out = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for b, t in m._buffers.items():
            if t is not None and b in m._non_persistent_buffers_set:
                out[f"{mname}.{b}" if mname else b] = t
    return out


def _all_tensors(model) -> dict[str, torch.Tensor]:
    out = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for d in (m._parameters, m._buffers):
            for a, t in d.items():
                if t is not None:
                    out[f"{mname}.{a}" if mname else a] = t
    return out


class _Plan:
    """What binding a model to a checkpoint means, computed before anything is changed."""

    def __init__(self):
        self.groups = []         # (bound ckpt key, [model names], sample tensor, [other stored ckpt keys])
        self.missing = []
        self.declared_missing = []
        self.unexpected = []
        self.ignored = []
        self.mismatches = []


def _plan(model, ck, *, dtype, key_map, tied, ignore_unexpected, ignore_missing) -> _Plan:
    plan = _Plan()
    sd = model.state_dict(keep_vars=True)
    # model name -> checkpoint name
    to_ck = {}
    if key_map:
        pairs = key_map.items() if isinstance(key_map, dict) else ((k, key_map(k)) for k in ck.keys())
        for ck_name, model_name in pairs:
            if ck_name in ck and model_name in sd and ck_name != model_name:
                to_ck.setdefault(model_name, ck_name)
    for name in sd:
        if name not in to_ck and name in ck:
            to_ck[name] = name
    # groups of names holding one tensor (Note [Tied weights])
    by_id: dict[int, list[str]] = {}
    for name, t in sd.items():
        by_id.setdefault(id(t), []).append(name)
    group_of = {n: gid for gid, names in by_id.items() for n in names}
    for target, source in (tied or {}).items():
        if target in sd and source in sd and group_of[target] != group_of[source] and target not in to_ck:
            a, b = group_of[target], group_of[source]
            by_id[b].extend(by_id.pop(a))
            for n in by_id[b]:
                group_of[n] = b
    used = set()
    miss_re = _regex(ignore_missing)
    for gid, names in by_id.items():
        stored = [to_ck[n] for n in names if n in to_ck]
        stored = list(dict.fromkeys(stored))
        if not stored:
            if miss_re is not None and all(miss_re.search(n) for n in names):
                plan.declared_missing.extend(names)
            else:
                plan.missing.extend(names)
            continue
        key = stored[0]
        used.update(stored)
        t = sd[names[0]]
        info = ck.info(key)
        if tuple(t.shape) != info.torch_shape:
            plan.mismatches.append(f"size mismatch for {names[0]}: copying a param with shape {torch.Size(info.torch_shape)} "
                                   f"from checkpoint, the shape in current model is {t.shape}.")
            continue
        if info.torch_dtype is None:
            plan.mismatches.append(f"unsupported dtype for {names[0]}: the checkpoint stores {info.dtype} "
                                   f"({key!r}), which torch cannot hold.")
            continue
        if t.dtype != info.torch_dtype and dtype is None:
            plan.mismatches.append(
                f"dtype mismatch for {names[0]}: copying a param with dtype {info.torch_dtype} from checkpoint, the "
                f"dtype in current model is {t.dtype}. Pass dtype={t.dtype} to convert while loading (or build the "
                f"model in {info.torch_dtype}).")
            continue
        if t.dtype != info.torch_dtype and (t.dtype.is_floating_point != info.torch_dtype.is_floating_point):
            plan.mismatches.append(f"dtype mismatch for {names[0]}: the checkpoint stores {info.torch_dtype}, the model "
                                   f"{t.dtype}; torchpool converts between floating dtypes only.")
            continue
        for other in stored[1:]:
            oi = ck.info(other)
            if oi.torch_shape != info.torch_shape or oi.torch_dtype != info.torch_dtype:
                plan.mismatches.append(f"tied names {', '.join(names)} are one tensor in the model, but the checkpoint "
                                       f"stores {key!r} and {other!r} with different shapes or dtypes.")
        plan.groups.append((key, names, t, stored[1:]))
    legacy = set(_non_persistent(model))
    unexp_re = _regex(ignore_unexpected)
    for k in ck.keys():
        if k in used:
            continue
        if k in legacy or (unexp_re is not None and unexp_re.search(k)):
            plan.ignored.append(k)
        else:
            plan.unexpected.append(k)
    return plan


def _bind(model, path, device, budget_bytes, *, strict, dtype, mode, key_map, tied, ignore_unexpected,
          ignore_missing, fix_meta, checkpoint_options, caller) -> LazyBinding:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module or a callable that builds one")
    if model in _BINDINGS:
        raise RuntimeError(f"{caller}: this model is already bound to a checkpoint")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{caller}: dtype must be a torch.dtype, not {dtype!r}")
    owns = not isinstance(path, Checkpoint)
    ck = open_checkpoint(path, **checkpoint_options) if owns else path
    try:
        plan = _plan(model, ck, dtype=dtype, key_map=key_map, tied=tied, ignore_unexpected=ignore_unexpected,
                     ignore_missing=ignore_missing)
        if plan.mismatches or (strict and (plan.missing or plan.unexpected)):
            raise RuntimeError(_mismatch_report(model, plan.missing if strict else [],
                                                plan.unexpected if strict else [], plan.mismatches))
        # Note [Unloaded placeholders]: nothing but bound tensors may stay on meta.
        bound_ids = {id(t) for _, _, t, _ in plan.groups}
        still = [n for n, t in _all_tensors(model).items()
                 if id(t) not in bound_ids and (t.device.type == "meta" or isinstance(t, _Unloaded))]
        if still and fix_meta is not None:
            fix_meta(model, still)
            still = [n for n, t in _all_tensors(model).items()
                     if id(t) not in bound_ids and (t.device.type == "meta" or isinstance(t, _Unloaded))]
        if still:
            stored = [n for n in still if n in plan.missing or n in plan.declared_missing]
            rest = [n for n in still if n not in stored]
            parts = []
            if rest:
                parts.append(f"{len(rest)} tensor(s) that no checkpoint holds (non-persistent buffers) are on the meta "
                             f"device: {', '.join(rest)}")
            if stored:
                parts.append(f"{len(stored)} tensor(s) that the checkpoint lacks are on the meta device: "
                             f"{', '.join(stored)} (missing from {ck.path}: give them real values before binding, "
                             "or use a checkpoint that holds them)")
            raise RuntimeError(f"{caller}: {'; '.join(parts)}. A forward pass over them would read garbage" +
                               (f"; {HOW_TO_BUILD}." if rest else "."))
        if plan.ignored:
            log.info("%s: skipped %d checkpoint tensor(s) the model ignores or no longer persists: %s", caller,
                     len(plan.ignored), ", ".join(plan.ignored))
        if not strict and (plan.missing or plan.unexpected):
            msg = []
            if plan.missing:
                msg.append(f"missing (left as built): {', '.join(plan.missing)}")
            if plan.unexpected:
                msg.append(f"unexpected (not loaded): {', '.join(plan.unexpected)}")
            warnings.warn(f"{caller}(strict=False) skipped keys of {ck.path}: " + "; ".join(msg), stacklevel=3)

        binding = LazyBinding(ck, device, budget_bytes, dtype, owns)
        binding.mode = mode
        binding.missing_keys = plan.missing + plan.declared_missing
        binding.unexpected_keys = plan.unexpected
        binding.ignored_keys = plan.ignored
        # tensors -> units: modules sharing a tensor are one unit (union-find over module ids)
        parent: dict[int, int] = {}

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        modules: dict[int, torch.nn.Module] = {}
        tensors = []
        for key, names, t, others in plan.groups:
            places = []
            for n in names:
                m, a = _place(model, n)
                if all(not (pm is m and pa == a) for pm, pa in places):
                    places.append((m, a))
            is_param = isinstance(t, torch.nn.Parameter)
            rg = bool(getattr(t, "requires_grad", False)) if is_param else False
            bt = _Tensor(key, names, places, is_param, rg, t.dtype, tuple(t.shape))
            bt.also_stored = others
            tensors.append(bt)
            if len(names) > 1:
                binding.tied[key] = names
            ids = []
            for m, _ in places:
                modules[id(m)] = m
                parent.setdefault(id(m), id(m))
                ids.append(id(m))
            for i in ids[1:]:
                ra, rb = find(ids[0]), find(i)
                if ra != rb:
                    parent[rb] = ra
        units: dict[int, _Unit] = {}
        for mid in parent:
            root = find(mid)
            u = units.get(root)
            if u is None:
                u = units[root] = _Unit()
            u.modules.append(modules[mid])
            binding.unit_of[mid] = u
        for bt in tensors:
            u = binding.unit_of[id(bt.places[0][0])]
            u.tensors.append(bt)
        binding.units = list(units.values())
        for u in binding.units:
            u.nbytes = sum(t.nbytes for t in u.tensors)
            binding._unload(u)  # placeholders; frees whatever the model held
            binding.lru[id(u)] = u
            for m in u.modules:
                binding.handles.append(m.register_forward_pre_hook(binding._pre))
                binding.handles.append(m.register_forward_hook(binding._post, always_call=True))
    except BaseException:
        if owns:
            ck.close()
        raise
    _BINDINGS[model] = binding
    return binding


def _prepare(model, caller: str, **kw):
    """The model to bind (built under init_empty_weights when given a callable) and the binding
    rules, completed with a transformers model's own (ties, ignored and missable keys)."""
    if not isinstance(model, torch.nn.Module):
        if not callable(model):
            raise TypeError(f"{caller}: model must be an nn.Module or a callable that builds one")
        with init_empty_weights():
            model = model()
    _hf_rules(model, kw)
    return model, kw


def load_lazily(model, path, device="cpu", budget_bytes: int | None = None, *, strict: bool = True, dtype=None,
                mode: str = "auto", key_map: dict | None = None, tied: dict | None = None,
                ignore_unexpected=(), ignore_missing=(), fix_meta=None, **checkpoint_options) -> torch.nn.Module:
    """Binds ``model``'s parameters and persistent buffers to the checkpoint at ``path`` by name and
    returns the model at once; each module's tensors are read the first time it runs, and with
    ``budget_bytes`` the least recently used are dropped again (Note [LRU budget]).

    ``model``: an ``nn.Module`` built under ``torchpool.init_empty_weights()`` (parameters on meta,
    buffers real; bound tensors are replaced by placeholders) or a zero-argument callable that builds
    one, which is called under ``init_empty_weights()``. A transformers model gets transformers'
    key rules (renames, base-model prefix, declared ties, ignorable keys) and its non-persistent buffers
    rebuilt from its config when they are on meta (``torchpool.hf``). ``path``: anything
    ``open_checkpoint`` takes, or an open Checkpoint.

    Ties (the same tensor under several names, or ``tied={target: source}``) are bound once
    (Note [Tied weights]). Checkpoint names that match ``ignore_unexpected`` (regexes) or that name a
    non-persistent buffer of the model (a legacy key) are skipped (``binding(model).ignored_keys``);
    model names matching ``ignore_missing`` may be absent. Other missing and unexpected names (with
    ``strict``) and shape mismatches raise RuntimeError in ``load_state_dict``'s words; with
    ``strict=False`` they are skipped with a warning listing them. A tensor left on meta raises,
    naming it. ``dtype``: allows converting checkpoint tensors to the dtype of the model tensor each
    is bound to (without it a dtype difference raises). ``key_map``: ``{checkpoint name: model
    name}`` for renamed keys. ``mode``: the read path of each load ("auto", "mmap", "read")."""
    model, kw = _prepare(model, "load_lazily", key_map=key_map, tied=tied, ignore_unexpected=ignore_unexpected,
                         ignore_missing=ignore_missing, fix_meta=fix_meta)
    _bind(model, path, device, budget_bytes, strict=strict, dtype=dtype, mode=mode,
          checkpoint_options=checkpoint_options, caller="load_lazily", **kw)
    return model


def load_into(model, path, device="cpu", *, strict: bool = True, dtype=None, mode: str = "auto", key_map=None,
              tied=None, ignore_unexpected=(), ignore_missing=(), fix_meta=None, **checkpoint_options):
    """``load`` + assign, done right: every tensor of the checkpoint read at once (one parallel
    ``Checkpoint.load``) and assigned to the model with the same rules as ``load_lazily`` (ties bound
    once and kept, ignorable and legacy keys skipped, nothing left on meta); no hooks stay behind and
    the model holds ordinary tensors (zero-copy views of the mapping on the CPU)."""
    model, kw = _prepare(model, "load_into", key_map=key_map, tied=tied, ignore_unexpected=ignore_unexpected,
                         ignore_missing=ignore_missing, fix_meta=fix_meta)
    b = _bind(model, path, device, None, strict=strict, dtype=dtype, mode=mode,
              checkpoint_options=checkpoint_options, caller="load_into", **kw)
    try:
        keys = [t.key for u in b.units for t in u.tensors]
        keys += [o for u in b.units for t in u.tensors for o in t.also_stored]
        if keys:
            # one read for the whole model, then each unit is placed (and ties checked) from it
            loaded = b.ck.load(list(dict.fromkeys(keys)), device=b.device, mode=mode, progress=None)
            for u in b.units:
                b._load(u, loaded)
            for u in b.units:
                u.views = []  # the tensors are the model's now: never dropped
    finally:
        for h in b.handles:
            h.remove()
        b.handles = []
        _BINDINGS.pop(model, None)
        if b.owns_checkpoint:
            b.ck.close()
    return model


def _hf_rules(model, kw):
    """Fills in transformers' key rules for a transformers model (imports nothing otherwise)."""
    import sys

    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(model, tf.PreTrainedModel):
        return
    from . import hf

    rules = hf.key_rules(model)
    if kw["key_map"] is None:
        kw["key_map"] = rules["key_map"]
    if kw["tied"] is None:
        kw["tied"] = rules["tied"]
    kw["ignore_unexpected"] = tuple(kw["ignore_unexpected"] or ()) + tuple(rules["ignore_unexpected"])
    kw["ignore_missing"] = tuple(kw["ignore_missing"] or ()) + tuple(rules["ignore_missing"])
    if kw["fix_meta"] is None:
        kw["fix_meta"] = rules["fix_meta"]


def binding(model) -> LazyBinding:
    try:
        return _BINDINGS[model]
    except KeyError:
        raise ValueError("this model was not loaded with torchpool.load_lazily") from None


def stats(model) -> dict:
    """resident_bytes, peak_resident_bytes, loads, evictions, bytes_loaded, over_budget, the
    checkpoint's read counters."""
    return binding(model).stats()


def materialize(model, modules=None):
    binding(model).materialize(modules)
    return model


_ = CheckpointError  # re-exported for users of this module
