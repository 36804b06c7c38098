"""Allocator configuration: keyword arguments of install() and the TORCHPOOL_CONF string.

TORCHPOOL_CONF is a comma-separated list of key=value, for example
``TORCHPOOL_CONF="cpu=1,max_cached_mb=4096"``. ``cpu=1`` / ``cuda=1`` choose the devices to
install on; every other key is an allocator option. Sizes may be given in bytes (``max_bytes``)
or with a unit suffix on the key (``max_mb``, ``max_cached_gb``, ``min_split_kb``).
"""

from __future__ import annotations

from ._build import _C

# Note [One option schema] (csrc/core/options.h): the options, their types, defaults per device, valid
# ranges and help come from the C++ table through _C.options(); nothing here restates them.
# name -> {name, type, unit, default: {device: value}, default_text, devices, scope, range, help}
OPTIONS: dict[str, dict] = {o["name"]: o for o in _C.options()}
_TYPES = {"bytes": int, "int": int, "float": float, "bool": bool}
_UNITS = {"_bytes": 1, "_kb": 1 << 10, "_mb": 1 << 20, "_gb": 1 << 30}
_SIZE_BASES = {k[: -len("_bytes")] for k, o in OPTIONS.items() if o["unit"] == "bytes"}
_SIZE_BASES.add("max")  # max_mb -> max_bytes
DEVICES = ("cpu", "cuda")


def options() -> list[dict]:
    """Every option of torchpool (the one schema, csrc/core/options.h): a list of dicts with name, type
    ("bytes", "int", "float", "bool"), unit, default ({device: value}), default_text (how the docs state
    the default, "" when it is the value), devices, scope ("pool", "upstream", "install"), range (the
    valid values as text) and help. Sizes are also accepted with _kb/_mb/_gb in place of _bytes."""
    return [dict(o, default=dict(o["default"]), devices=list(o["devices"])) for o in OPTIONS.values()]


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
        typ = _TYPES[OPTIONS[name]["type"]]
        if name in out:
            raise ConfigError(f"torchpool: option {name!r} given twice (as {key!r})")
        if typ is bool:
            out[name] = _parse_bool(key, value)
            continue
        bad = ConfigError(f"torchpool: option {key}={value!r} is out of range; valid: {OPTIONS[name]['range']}"
                          + (f" (here in units of {key[key.rfind('_') + 1:]})" if scale > 1 else ""))
        if isinstance(value, bool):
            raise ConfigError(f"torchpool: option {key!r} takes a number, not {value!r}")
        try:
            if typ is float:
                number = float(value)
            elif isinstance(value, (int, float)):
                number = value
            else:  # text: exact as an integer when it is one
                text = str(value).strip()
                try:
                    number = int(text)
                except ValueError:
                    number = float(text)
            scaled = number if typ is float else (number * scale if isinstance(number, int) else int(number * scale))
        except (TypeError, ValueError, OverflowError):  # not a number, nan, inf
            if isinstance(value, (int, float, str)) and str(value).strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
                raise bad from None
            raise ConfigError(f"torchpool: option {key!r} takes a number, not {value!r}") from None
        if not _C.option_in_range(name, scaled):  # the schema's rule, the one copy
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


def _format_default(o: dict, value: object) -> str:
    if o["type"] == "bool":
        return "true" if value else "false"
    if o["type"] == "float":
        return f"{value:g}"
    if o["unit"] == "bytes":
        if value == (1 << 64) - 1:
            return "unlimited"
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value >= size and value % size == 0:
                return f"{value // size} {unit}"
    return str(value)


def options_table() -> str:
    """The README's option table (Markdown), generated from the schema: tools/gen_options_table.py
    writes it into README.md and tests/test_options.py checks that README.md holds exactly this."""
    rows = ["| option | type | default | valid | meaning |", "|---|---|---|---|---|"]
    for o in OPTIONS.values():
        if o["default_text"]:
            default = o["default_text"]
        else:
            d = {dev: _format_default(o, v) for dev, v in o["default"].items()}
            if len(d) == 1:
                default = f"{next(iter(d.values()))} ({next(iter(d)).upper()} only)"
            elif len(set(d.values())) == 1:
                default = d["cpu"]
            else:
                default = ", ".join(f"{v} on {dev.upper()}" for dev, v in d.items())
        kind = o["type"] + (" (`_kb`, `_mb`, `_gb`)" if o["unit"] == "bytes" else "")
        valid = o["range"].replace("*", r"\*")
        rows.append(f"| `{o['name']}` | {kind} | {default} | {valid} | {o['help']} |")
    return "\n".join(rows) + "\n"
