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
_KIB, _MIB, _GIB = 1 << 10, 1 << 20, 1 << 30
_SIZE_MAX = (1 << 64) - 1
_MAX_REQUEST = 1 << 62  # Note [Impossible sizes] (csrc/core/allocator.h)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# option -> (lowest, highest, power of two?, the range as the error states it). Same bounds as the C++
# side (pool.h kMaxAlignment / kMaxRoundingBytes, CachingAllocator::kMaxRequestBytes).
RANGES: dict[str, tuple[float, float, bool, str]] = {
    "max_bytes": (0, _MAX_REQUEST, False, "0 (no limit) to 2**62 bytes"),
    "max_cached_bytes": (0, _SIZE_MAX, False, "0 to 2**64-1 bytes"),
    "max_reserved_ratio": (0, 1e6, False, "0 (off) or a ratio from 1 to 1e6"),
    "arenas": (1, 256, False, "1 to 256"),
    "max_class_bytes": (0, _MIB, False, "0 to 1048576 (1 MiB)"),
    "chunk_bytes": (4 * _KIB, _GIB, True, "a power of two from 4096 to 1073741824 (1 GiB)"),
    "small_segment_bytes": (0, _GIB, False, "0 to 1073741824 (1 GiB)"),
    "large_rounding": (0, _GIB, False, "0 to 1073741824 (1 GiB)"),
    "min_split_bytes": (0, _MAX_REQUEST, False, "0 to 2**62 bytes"),
    "max_split_bytes": (0, _SIZE_MAX, False, "0 to 2**64-1 bytes"),
    "alignment": (64, _MIB, True, "a power of two from 64 to 1048576 (1 MiB)"),
    "reserve_bytes": (0, _MAX_REQUEST, False, "0 (default) to 2**62 bytes"),
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
            continue
        lo, hi, pow2, valid = RANGES[name]
        bad = ConfigError(f"torchpool: option {key}={value!r} is out of range; valid: {valid}"
                          + (f" (here in units of {key[key.rfind('_') + 1:]})" if scale > 1 else ""))
        if typ is float:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"torchpool: option {key!r} takes a number, not {value!r}") from None
            if not (number == 0 or 1 <= number <= hi):  # also refuses nan and inf
                raise bad
            out[name] = number
            continue
        if isinstance(value, bool):
            raise ConfigError(f"torchpool: option {key!r} takes a number, not {value!r}")
        try:
            number = int(value) if isinstance(value, int) else float(value)
            scaled = int(number * scale) if isinstance(number, float) else number * scale
        except (TypeError, ValueError, OverflowError):  # not a number, nan, inf
            if isinstance(value, (int, float, str)) and str(value).strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
                raise bad from None
            raise ConfigError(f"torchpool: option {key!r} takes a number, not {value!r}") from None
        if not (lo <= scaled <= hi) or (pow2 and not _pow2(scaled)):
            raise bad
        out[name] = scaled
    return out


def parse_conf(text: str) -> tuple[list[str], dict[str, object]]:
    """Parse a TORCHPOOL_CONF string into (devices to install on, allocator options)."""
    devices: list[str] = []
    seen_devices: set[str] = set()  # cpu=0 turns a device off on purpose: options may stay
    options: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ConfigError(f"torchpool: TORCHPOOL_CONF item {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        if key in DEVICES:
            seen_devices.add(key)
            if _parse_bool(key, value):
                devices.append(key)
            continue
        options[key] = value
    normalize(options)  # validate now, with the user's spelling in the error
    if options and not devices and not seen_devices:
        # One behaviour for TORCHPOOL_CONF and `torchpool run --conf`: options with no device are a
        # mistake (they used to install nothing, silently), not a request to do nothing.
        raise ConfigError(f"torchpool: the configuration names options ({', '.join(options)}) but no device; "
                          "add cpu=1 (or cuda=1)")
    return devices, options


def default_arenas() -> int:
    return max(1, min(4, os.cpu_count() or 1))
