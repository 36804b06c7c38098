"""install() / uninstall(): put torchpool in PyTorch's allocator slots, and read its state."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import torch

from . import _config
from ._build import _C
from .stats import derive


def _device_kind(device: str | torch.device | None) -> str:
    dev = torch.device("cpu" if device is None else device)
    if dev.type not in _config.DEVICES:
        raise ValueError(f"torchpool: device {str(dev)!r} is not supported (cpu or cuda)")
    return dev.type


def install(device: str | torch.device = "cpu", **options) -> "_C.Allocator":
    """Make torchpool PyTorch's allocator for `device` and return the allocator.

    Options (see torchpool._config.OPTIONS; sizes also as *_kb/_mb/_gb): max_bytes, max_cached_bytes,
    arenas, huge_pages, size_classes, min_split_bytes, max_split_bytes, ...
    Installing again with options replaces the allocator for new tensors; tensors made before are
    still freed by the allocator that made them.
    """
    kind = _device_kind(device)
    publish = _config._parse_bool("publish", options.pop("publish", True))  # `torchpool top` (top.py)
    if kind == "cuda":
        from . import cuda

        return cuda.install(device, **options)
    cfg = _config.normalize(options)
    current = _C.cpu_active()
    if current is not None and not options:
        return current
    cfg.setdefault("arenas", _config.default_arenas())
    # Expandable segments are the CPU default (Note [Holes in expandable segments]; measured in
    # docs/performance.md): the least resident memory and the fastest large-tensor reuse here.
    expandable = cfg.pop("expandable_segments", True)
    if not expandable:
        cfg.pop("chunk_bytes", None)  # a property of expandable segments only
    alloc = _C.Allocator("host_vmm" if expandable else "host", device_name="cpu", **cfg)
    _C.install_cpu(alloc)
    from .top import set_publishing

    set_publishing(publish)
    return alloc


def uninstall(device: str | torch.device = "cpu") -> None:
    """Stop serving new tensors on `device`. Live torchpool tensors stay valid and are freed by it."""
    kind = _device_kind(device)
    if kind == "cuda":
        from . import cuda

        return cuda.uninstall(device)
    _C.uninstall_cpu()


@contextlib.contextmanager
def installed(device: str | torch.device = "cpu", **options) -> Iterator["_C.Allocator"]:
    """``with torchpool.installed(): ...`` installs for the block and uninstalls after it."""
    alloc = install(device, **options)
    try:
        yield alloc
    finally:
        uninstall(device)


def is_installed(device: str | torch.device = "cpu") -> bool:
    return allocator(device) is not None


def allocator(device: str | torch.device = "cpu"):
    """The torchpool allocator serving `device` now, or None."""
    kind = _device_kind(device)
    if kind == "cuda":
        from . import cuda

        return cuda.allocator(device)
    return _C.cpu_active()


def _require(device) -> "_C.Allocator":
    alloc = allocator(device)
    if alloc is None:
        raise RuntimeError(f"torchpool is not installed for {device!s}; call torchpool.install({str(device)!r}) first")
    return alloc


def memory_stats(device: str | torch.device = "cpu") -> dict:
    """Counters named as in torch.cuda.memory_stats(), plus fragmentation measures:
    utilization, internal_waste_bytes, external_fragmentation, and a size_classes table."""
    return derive(_require(device).stats())


def reset_peak_stats(device: str | torch.device = "cpu") -> None:
    _require(device).reset_peak_stats()


def memory_snapshot(device: str | torch.device = "cpu") -> list[dict]:
    """Segments and their blocks (address, size, requested_size, state), like torch.cuda.memory_snapshot()."""
    return _require(device).snapshot()


def empty_cache(device: str | torch.device = "cpu") -> int:
    """Return every entirely free segment to the upstream. Returns the bytes released."""
    return _require(device).empty_cache()


def _install_from_environment() -> None:
    text = os.environ.get("TORCHPOOL_CONF", "").strip()
    if not text:
        return
    try:
        devices, options = _config.parse_conf(text)
    except _config.ConfigError as e:
        raise _config.ConfigError(f"{e} (from TORCHPOOL_CONF={text!r})") from None
    for dev in devices:
        install(dev, **options)
    if os.environ.get("TORCHPOOL_VERBOSE"):
        print(f"torchpool: installed on {', '.join(devices) or 'nothing'} from TORCHPOOL_CONF", file=sys.stderr)
