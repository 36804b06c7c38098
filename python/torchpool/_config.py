"""Allocator configuration: keyword arguments of install() and the TORCHPOOL_CONF string.

TORCHPOOL_CONF is a comma-separated list of key=value, for example
``TORCHPOOL_CONF="cpu=1,max_cached_mb=4096"``. ``cpu=1`` / ``cuda=1`` choose the devices to
install on; every other key is an allocator option. Sizes may be given in bytes (``max_bytes``)
or with a unit suffix on the key (``max_mb``, ``max_cached_gb``, ``min_split_kb``).
"""

from __future__ import annotations

import os

# option -> (type, help). Names end in _bytes where they are sizes; unit-suffixed aliases convert.
OPTIONS: dict[str, tuple[type, str]] = {
    "max_bytes": (int, "limit on reserved bytes; above it allocation raises torch.OutOfMemoryError (0: none)"),
    "max_cached_bytes": (int, "cached (reserved - allocated) bytes kept before free segments are returned"),
    "max_reserved_ratio": (float, "before mapping more, return free memory so that reserved <= ratio x the high-water of "
                                  "allocated bytes (default 1.05; 0: never; Note [Reserve target])"),
    "arenas": (int, "independent arenas for size-class requests (threads pick one round-robin)"),
    "huge_pages": (bool, "madvise(MADV_HUGEPAGE) on segments of 2 MiB and more (host upstream)"),
    "populate": (bool, "fault pages in when a segment is mapped (host upstream)"),
    "size_classes": (bool, "serve small requests from per-class free lists (False: best fit)"),
    "max_class_bytes": (int, "requests up to this use size classes; larger ones up to 1 MiB are best fit in small segments"),
    "chunk_bytes": (int, "cpu expandable segments: the unit memory is mapped and returned in (power of two)"),
    "small_segment_bytes": (int, "size of the segments that hold size-class blocks"),
    "large_rounding": (int, "large blocks are rounded up to a multiple of this"),
    "min_split_bytes": (int, "a large free block is split only if the rest is at least this"),
    "max_split_bytes": (int, "free blocks larger than this are never split (PyTorch's max_split_size)"),
    "alignment": (int, "alignment and size quantum of every block (power of two >= 64)"),
    "expandable_segments": (bool, "one reserved address range per stream, memory mapped in chunks behind allocated blocks "
                                  "(cpu: host_vmm, the default; cuda: VMM, off by default)"),
    "publish": (bool, "publish counters for `torchpool top` in a shared-memory page (default on; torchpool/top.py)"),
    "reserve_bytes": (int, "address space reserved per expandable segment (0: the memory size of the machine / device)"),
}
_UNITS = {"_bytes": 1, "_kb": 1 << 10, "_mb": 1 << 20, "_gb": 1 << 30}
_SIZE_BASES = {k[: -len("_bytes")] for k in OPTIONS if k.endswith("_bytes")}
_SIZE_BASES.add("max")  # max_mb -> max_bytes
DEVICES = ("cpu", "cuda")


class ConfigError(ValueError):
    """A TORCHPOOL_CONF string or an install() option that torchpool does not understand."""


def _parse_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"torchpool: option {key!r} takes a boolean (1/0, true/false), not {value!r}")


def normalize(options: dict[str, object]) -> dict[str, object]:
    """Turn user options (with unit suffixes, strings) into the allocator's byte-valued options."""
    out: dict[str, object] = {}
    for key, value in options.items():
        name, scale = key, 1
        for suffix, mult in _UNITS.items():
            base = key[: -len(suffix)] if key.endswith(suffix) else None
            if base in _SIZE_BASES:
                name = "max_bytes" if base == "max" else base + "_bytes"
                scale = mult
                break
        if name not in OPTIONS:
            known = ", ".join(sorted(OPTIONS))
            raise ConfigError(f"torchpool: unknown option {key!r}; known options: {known} (sizes also as _kb/_mb/_gb)")
        typ = OPTIONS[name][0]
        if name in out:
            raise ConfigError(f"torchpool: option {name!r} given twice (as {key!r})")
        if typ is bool:
            out[name] = _parse_bool(key, value)
        elif typ is float:
            try:
                out[name] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"torchpool: option {key!r} takes a number, not {value!r}") from None
            if not (out[name] == 0 or out[name] >= 1):
                raise ConfigError(f"torchpool: option {key!r} must be 0 (off) or a ratio >= 1, not {value!r}")
        else:
            try:
                number = float(value) if isinstance(value, str) else value
                out[name] = int(number * scale)
            except (TypeError, ValueError):
                raise ConfigError(f"torchpool: option {key!r} takes a number, not {value!r}") from None
            if out[name] < 0:
                raise ConfigError(f"torchpool: option {key!r} must not be negative")
    return out


def parse_conf(text: str) -> tuple[list[str], dict[str, object]]:
    """Parse a TORCHPOOL_CONF string into (devices to install on, allocator options)."""
    devices: list[str] = []
    options: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ConfigError(f"torchpool: TORCHPOOL_CONF item {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        if key in DEVICES:
            if _parse_bool(key, value):
                devices.append(key)
            continue
        options[key] = value
    normalize(options)  # validate now, with the user's spelling in the error
    return devices, options


def default_arenas() -> int:
    return max(1, min(4, os.cpu_count() or 1))
