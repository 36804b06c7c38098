"""Models larger than memory: parameters bound to a checkpoint, real only while their module runs.

    with torch.device("meta"):
        model = MyModel(config)                       # no memory
    model = torchpool.load_lazily(model, "ckpt/", budget_bytes=1 << 30)
    out = model(x)                                    # each module's weights come in when it runs
    torchpool.lazy.stats(model)                       # resident / peak bytes, loads, evictions

Note [LRU budget]
-----------------
Rationale: a forward pass touches modules in order and never needs all weights at once, so a
checkpoint larger than memory can run if weights come in when a module starts and leave once the
budget needs room.  Approach: every parameter and persistent buffer named in the model's state dict
is bound to the checkpoint tensor of the same name and replaced by a meta-device placeholder.  A
forward pre-hook on each module that directly owns bound tensors loads them (``Checkpoint.load``
with the module's names: zero-copy views of the mapping, cold pieces read ahead in parallel, Note
[Choosing the read path] in checkpoint.py) and moves the module to the most-recent end of an LRU.
Before loading, least recently used modules are evicted until resident bytes + the module's bytes
fit in ``budget_bytes``; evicting puts the placeholders back, and for mapped views also drops this
process's page-table entries for those pages (``MADV_DONTNEED``), so RSS follows the budget (the page
cache keeps the data; the kernel reclaims it as it needs).  Modules whose forward is still running
(the active stack, kept by pre/post hooks with ``always_call``) are never evicted.  Resident bytes are
counted from the tensors actually held.
Limitations: a module larger than the budget is still loaded (the budget is exceeded by it alone and
``over_budget`` counts it); a parameter used outside its own module's forward (weights read by a parent,
tied weights used through another module) must be loaded first with ``materialize(model)``; evicted
weights come back from the checkpoint, so in-place changes to lazily bound weights do not survive
eviction (this is for inference); non-persistent buffers are not in the checkpoint and stay as built.
"""

from __future__ import annotations

import collections
import weakref

import torch

from .checkpoint import Checkpoint, CheckpointError, open_checkpoint

__all__ = ["load_lazily", "stats", "materialize", "LazyBinding"]


class _Bound:
    __slots__ = ("module", "entries", "nbytes", "resident", "active", "views")

    def __init__(self, module):
        self.module = module
        self.entries = []  # (attr, key, is_param, requires_grad)
        self.nbytes = 0
        self.resident = False
        self.active = 0
        self.views = []  # (shard, offset, nbytes) of mapped views held


class LazyBinding:
    """The state behind a lazily loaded model (``torchpool.lazy.stats(model)`` reads it)."""

    def __init__(self, model, ck: Checkpoint, device, budget_bytes, dtype, owns_checkpoint):
        self.ck = ck
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.owns_checkpoint = owns_checkpoint
        self.bound: dict[int, _Bound] = {}
        self.lru: collections.OrderedDict[int, _Bound] = collections.OrderedDict()
        self.handles = []
        self.mode = "auto"
        self.counters = dict(resident_bytes=0, peak_resident_bytes=0, loads=0, evictions=0, bytes_loaded=0, over_budget=0)

    # ---- hooks ----
    def _pre(self, module, args):
        b = self.bound[id(module)]
        b.active += 1
        if not b.resident:
            self._make_room(b)
            self._load(b)
        self.lru.move_to_end(id(module))

    def _post(self, module, args, output):
        self.bound[id(module)].active -= 1

    def _make_room(self, b: _Bound):
        if self.budget_bytes is None:
            return
        c = self.counters
        for key in list(self.lru):
            if c["resident_bytes"] + b.nbytes <= self.budget_bytes:
                break
            other = self.lru[key]
            if other is b or other.active or not other.resident:
                continue
            self._evict(other)
        if c["resident_bytes"] + b.nbytes > self.budget_bytes:
            c["over_budget"] += 1

    def _load(self, b: _Bound):
        keys = [k for _, k, _, _ in b.entries]
        tensors = self.ck.load(keys, device=self.device, dtype=self.dtype, mode=self.mode, progress=False)
        mapped = self.ck.stats()["last_load_path"] == "mmap"
        held = 0
        for attr, key, is_param, rg in b.entries:
            t = tensors[key]
            held += t.numel() * t.element_size()
            if is_param:
                b.module._parameters[attr] = torch.nn.Parameter(t, requires_grad=rg and t.is_floating_point())
            else:
                b.module._buffers[attr] = t
        if mapped and self.dtype is None:
            b.views = [(self.ck.shards[i.shard], i.offset, i.nbytes) for i in (self.ck.info(k) for k in keys)]
        b.nbytes = held
        b.resident = True
        c = self.counters
        c["loads"] += 1
        c["bytes_loaded"] += held
        c["resident_bytes"] += held
        c["peak_resident_bytes"] = max(c["peak_resident_bytes"], c["resident_bytes"])

    def _evict(self, b: _Bound):
        for attr, key, is_param, rg in b.entries:
            info = self.ck.info(key)
            dtype = self.dtype or info.torch_dtype
            ph = torch.empty(info.torch_shape, dtype=dtype, device="meta")
            if is_param:
                b.module._parameters[attr] = torch.nn.Parameter(ph, requires_grad=rg and ph.is_floating_point())
            else:
                b.module._buffers[attr] = ph
        for shard, offset, nbytes in b.views:
            shard.drop_mapped(offset, nbytes)
        b.views = []
        b.resident = False
        self.counters["resident_bytes"] -= b.nbytes
        self.counters["evictions"] += 1

    # ---- API ----
    def materialize(self, modules=None):
        """Loads the bound tensors of the given modules (default: all) without running them; they
        count against the budget like any other."""
        for b in list(self.bound.values()):
            if modules is None or b.module in modules:
                if not b.resident:
                    self._make_room(b)
                    self._load(b)
                self.lru.move_to_end(id(b.module))

    def evict_all(self):
        for b in self.bound.values():
            if b.resident and not b.active:
                self._evict(b)

    def stats(self) -> dict:
        d = dict(self.counters)
        d["budget_bytes"] = self.budget_bytes
        d["bound_modules"] = len(self.bound)
        d["bound_bytes"] = sum(self.ck.info(k).nbytes for b in self.bound.values() for _, k, _, _ in b.entries)
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


def _nbytes(info, dtype) -> int:
    n = 1
    for d in info.torch_shape:
        n *= d
    return n * (dtype or info.torch_dtype).itemsize


def load_lazily(model, path, device="cpu", budget_bytes: int | None = None, *, strict: bool = True, dtype=None,
                mode: str = "auto", **checkpoint_options) -> torch.nn.Module:
    """Binds ``model``'s parameters and persistent buffers to the checkpoint at ``path`` by name and
    returns the model at once; each module's tensors are read the first time it runs, and with
    ``budget_bytes`` the least recently used are dropped again (Note [LRU budget]).

    ``model``: an ``nn.Module`` (ideally built on the meta device; bound tensors are replaced by meta
    placeholders) or a zero-argument callable that builds one, which is called under
    ``torch.device("meta")``. ``path``: anything ``open_checkpoint`` takes, or an open Checkpoint.
    Missing and unexpected names (with ``strict``) and shape or dtype mismatches raise RuntimeError
    in ``load_state_dict``'s words. ``dtype``: convert checkpoint tensors to it (the model must then
    have that dtype). ``mode``: the read path of each module's load ("auto", "mmap", "read")."""
    if not isinstance(model, torch.nn.Module):
        if not callable(model):
            raise TypeError("load_lazily: model must be an nn.Module or a callable that builds one")
        with torch.device("meta"):
            model = model()
    if model in _BINDINGS:
        raise RuntimeError("load_lazily: this model is already bound to a checkpoint")
    owns = not isinstance(path, Checkpoint)
    ck = open_checkpoint(path, **checkpoint_options) if owns else path
    try:
        sd = model.state_dict(keep_vars=True)
        expected = list(sd)
        names = set(ck.keys())
        missing = [k for k in expected if k not in names]
        exp = set(expected)
        unexpected = [k for k in ck.keys() if k not in exp]
        mismatches = []
        for k in expected:
            if k not in names:
                continue
            info = ck.info(k)
            t = sd[k]
            if tuple(t.shape) != info.torch_shape:
                mismatches.append(f"size mismatch for {k}: copying a param with shape {torch.Size(info.torch_shape)} from "
                                  f"checkpoint, the shape in current model is {t.shape}.")
                continue
            if info.torch_dtype is None:
                mismatches.append(f"unsupported dtype for {k}: the checkpoint stores {info.dtype}, which torch cannot hold.")
                continue
            want = dtype or info.torch_dtype
            if t.dtype != want:
                mismatches.append(f"dtype mismatch for {k}: copying a param with dtype {want} from checkpoint, the dtype "
                                  f"in current model is {t.dtype} (pass dtype={t.dtype} to load_lazily to convert on load).")
        if mismatches or (strict and (missing or unexpected)):
            raise RuntimeError(_mismatch_report(model, missing if strict else [], unexpected if strict else [], mismatches))

        binding = LazyBinding(model, ck, device, budget_bytes, dtype, owns)
        binding.mode = mode
        binding.missing_keys, binding.unexpected_keys = missing, unexpected
        for k in expected:
            if k not in names:
                continue
            mod_name, _, attr = k.rpartition(".")
            module = model.get_submodule(mod_name) if mod_name else model
            is_param = attr in module._parameters
            b = binding.bound.get(id(module))
            if b is None:
                b = binding.bound[id(module)] = _Bound(module)
                binding.lru[id(module)] = b
            rg = bool(getattr(sd[k], "requires_grad", False)) if is_param else False
            b.entries.append((attr, k, is_param, rg))
        for b in binding.bound.values():
            b.nbytes = sum(_nbytes(ck.info(k), dtype) for _, k, _, _ in b.entries)
            binding._evict(b)  # meta placeholders; frees whatever the model held
            binding.counters["evictions"] -= 1
            binding.handles.append(b.module.register_forward_pre_hook(binding._pre))
            binding.handles.append(b.module.register_forward_hook(binding._post, always_call=True))
        binding.counters["resident_bytes"] = 0
    except BaseException:
        if owns:
            ck.close()
        raise
    _BINDINGS[model] = binding
    return model


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
