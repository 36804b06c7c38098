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

    Options: torchpool.options() (the one schema, csrc/core/options.h; sizes also as *_kb/_mb/_gb):
    max_bytes, max_cached_bytes, arenas, huge_pages, size_classes, min_split_bytes, max_split_bytes, ...
    Those not given take the schema's CPU defaults (the same ones `torchpool bench fragmentation`'s
    "torchpool" mode replays).
    Installing again with options replaces the allocator for new tensors; tensors made before are
    still freed by the allocator that made them, and memory_stats() keeps counting them (README
    "Statistics"). An allocator with no tensor left is freed and its memory returned.
    """
    kind = _device_kind(device)
    publish = _config._parse_bool("publish", options.pop("publish", True))  # `torchpool top` (cli/top.py)
    if kind == "cuda":
        from . import cuda

        return cuda.install(device, **options)
    cfg = _config.normalize(options)
    current = _C.cpu_active()
    if current is not None and not options:
        return current
    # "cpu": host_vmm (expandable segments, the CPU default: Note [Holes in expandable segments];
    # measured in docs/measurements/2026-11-24-allocators.md), or one mmap per segment with expandable_segments=False.
    alloc = _C.Allocator("cpu", device_name="cpu", **cfg)
    _C.install_cpu(alloc)
    from .cli.top import set_publishing

    set_publishing(publish)
    return alloc


def uninstall(device: str | torch.device = "cpu") -> None:
    """Stop serving new tensors on `device`. Live torchpool tensors stay valid and are freed by it;
    statistics stay readable (memory_stats())."""
    kind = _device_kind(device)
    if kind == "cuda":
        from . import cuda

        return cuda.uninstall(device)
    _C.uninstall_cpu()


@contextlib.contextmanager
def installed(device: str | torch.device = "cpu", **options) -> Iterator["_C.Allocator"]:
    """``with torchpool.installed(): ...`` installs for the block; after it, whatever served `device`
    before serves it again (an earlier install(), or nothing). Blocks nest."""
    kind = _device_kind(device)
    previous = _C.cpu_active() if kind == "cpu" else None
    alloc = install(device, **options)
    try:
        yield alloc
    finally:
        if kind != "cpu" or previous is None:
            uninstall(device)
        elif _C.cpu_active() is not previous:
            _C.install_cpu(previous)


def is_installed(device: str | torch.device = "cpu") -> bool:
    return allocator(device) is not None


def allocator(device: str | torch.device = "cpu"):
    """The torchpool allocator serving `device` now, or None."""
    kind = _device_kind(device)
    if kind == "cuda":
        from . import cuda

        return cuda.allocator(device)
    return _C.cpu_active()


def _cpu_allocators() -> list:
    return list(_C.cpu_allocators())


def memory_stats(device: str | torch.device = "cpu") -> dict:
    """Counters named as in torch.cuda.memory_stats(), plus fragmentation measures:
    utilization, internal_waste_bytes, external_fragmentation, and a size_classes table.

    On the CPU they cover every torchpool allocator of the process (README "Statistics"): the
    installed one, earlier ones whose tensors are still alive, and the final counters of those
    already freed. Readable at any time, also after uninstall() (then the current gauges count only
    tensors still alive, 0 once they are gone)."""
    if _device_kind(device) == "cuda":
        return derive(_require(device).stats())
    return derive(_C.cpu_stats())


def reset_peak_stats(device: str | torch.device = "cpu") -> None:
    if _device_kind(device) == "cuda":
        return _require(device).reset_peak_stats()
    _C.cpu_reset_peaks()


def memory_snapshot(device: str | torch.device = "cpu") -> list[dict]:
    """Segments and their blocks (address, size, requested_size, state), like torch.cuda.memory_snapshot().
    On the CPU: the segments of every torchpool allocator that holds memory (empty when none does)."""
    if _device_kind(device) == "cuda":
        return _require(device).snapshot()
    segments = [seg for a in _cpu_allocators() for seg in a.snapshot()]
    return sorted(segments, key=lambda seg: seg["address"])


def empty_cache(device: str | torch.device = "cpu") -> int:
    """Return every entirely free segment to the upstream. Returns the bytes released."""
    if _device_kind(device) == "cuda":
        return _require(device).empty_cache()
    return sum(a.empty_cache() for a in _cpu_allocators())


def _require(device) -> "_C.Allocator":
    """The allocator serving `device` now; RuntimeError when none does."""
    alloc = allocator(device)
    if alloc is None:
        raise RuntimeError(f"torchpool is not installed for {device!s}; call torchpool.install({str(device)!r}) first")
    return alloc


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
