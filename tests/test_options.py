"""The one option schema (Note [One option schema], csrc/core/options.h): torchpool.options(), the
README table generated from it, the same rule at every entry (install() / TORCHPOOL_CONF / Allocator
kwargs; the CUDA library's text boundary is in test_cuda_fake.py), and the replay mode "torchpool"
being exactly what install() builds."""

import json
import re
import sys
from pathlib import Path

import pytest

import torchpool
from torchpool import _C, _config

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"name", "type", "unit", "default", "default_text", "devices", "scope", "range", "help"}


def _by_name():
    return {o["name"]: o for o in torchpool.options()}


def test_options_list_every_option_with_its_schema():
    opts = _by_name()
    assert {"max_bytes", "max_cached_bytes", "max_reserved_ratio", "arenas", "thread_cache", "size_classes", "max_class_bytes",
            "small_segment_bytes", "large_rounding", "min_split_bytes", "max_split_bytes", "alignment",
            "expandable_segments", "chunk_bytes", "reserve_bytes", "huge_pages", "populate", "publish"} == set(opts)
    for o in opts.values():
        assert set(o) == KEYS, o["name"]
        assert o["help"] and o["range"] and o["devices"], o["name"]
        assert set(o["default"]) == set(o["devices"]) <= {"cpu", "cuda"}
        assert o["unit"] == ("bytes" if o["type"] == "bytes" else "")
    # defaults per device
    assert opts["alignment"]["default"] == {"cpu": 64, "cuda": 512}
    assert opts["expandable_segments"]["default"] == {"cpu": True, "cuda": False}
    assert opts["max_reserved_ratio"]["default"] == {"cpu": 1.05, "cuda": 1.05}
    assert opts["max_split_bytes"]["default"]["cpu"] == 2**64 - 1
    assert 1 <= opts["arenas"]["default"]["cpu"] <= 4 and opts["arenas"]["default"]["cuda"] == 1
    assert opts["chunk_bytes"]["devices"] == ["cpu"] and opts["huge_pages"]["devices"] == ["cpu"]
    # the rules, as text
    assert opts["max_reserved_ratio"]["range"] == "0 (off) or a number from 1 to 1000000"
    assert opts["alignment"]["range"] == "a power of two from 64 to 1048576 (1 MiB)"
    assert opts["arenas"]["range"] == "an integer from 1 to 256"
    assert opts["max_bytes"]["range"] == "an integer from 0 to 2**62"
    assert opts["size_classes"]["range"].startswith("a boolean")
    # a copy: changing it changes nothing
    torchpool.options()[0]["default"]["cpu"] = -1
    assert torchpool.options()[0]["default"]["cpu"] != -1


def test_readme_option_table_is_the_generated_one():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gen_options_table as gen
    finally:
        sys.path.pop(0)
    text = (ROOT / "README.md").read_text()
    table = text[text.index(gen.BEGIN) + len(gen.BEGIN): text.index(gen.END)]
    assert table == _config.options_table(), "run python tools/gen_options_table.py"
    assert all(f"| `{name}` |" in table for name in _by_name())


def _bounds(text: str) -> tuple[int, int]:
    """The two numbers of a range text such as "a power of two from 64 to 1048576 (1 MiB)"."""
    toks = re.findall(r"2\*\*\d+(?:-1)?|\d+", re.sub(r"\([^)]*\)", "", text))
    nums = [2**64 - 1 if t == "2**64-1" else 2 ** int(t[3:]) if t.startswith("2**") else int(t) for t in toks]
    return nums[0], nums[-1]


def _bad_and_good(o):
    """A value outside the option's range and one inside it, read from the schema's own text."""
    if o["type"] == "float":
        return 0.5, 1.5
    lo, hi = _bounds(o["range"])
    if "power of two" in o["range"]:
        return lo + 1, lo  # within the bounds, not a power of two
    return (hi + 1, lo) if hi < 2**64 - 1 else (-1, lo)


NUMERIC = [o for o in torchpool.options() if o["type"] != "bool" and o["scope"] != "install"]


@pytest.mark.parametrize("o", NUMERIC, ids=[o["name"] for o in NUMERIC])
def test_one_rule_for_install_and_allocator_kwargs(o):
    bad, good = _bad_and_good(o)
    name = o["name"]
    with pytest.raises(torchpool.ConfigError) as e:  # install() / TORCHPOOL_CONF / torchpool run --conf
        _config.normalize({name: bad})
    assert f"{name}={bad!r}" in str(e.value) and o["range"] in str(e.value)
    with pytest.raises(torchpool.ConfigError):
        _config.normalize({name: str(bad)})  # as TORCHPOOL_CONF spells it
    assert _config.normalize({name: good}) == {name: good}
    assert _config.normalize({name: str(good)}) == {name: good}
    upstream = "cpu" if o["scope"] == "upstream" else "fake"
    with pytest.raises(ValueError) as e:  # _C.Allocator's keyword arguments
        _C.Allocator(upstream, **{name: bad})
    assert f"{name}={bad!r}" in str(e.value) and o["range"] in str(e.value)
    assert not _C.option_in_range(name, bad) and _C.option_in_range(name, good)


def test_allocator_kwargs_refuse_wrong_types_and_options_an_upstream_does_not_read():
    with pytest.raises(ValueError, match=r"arenas=2\.5 is not an integer; valid: an integer from 1 to 256"):
        _C.Allocator("fake", arenas=2.5)
    with pytest.raises(ValueError, match="size_classes=2 is not a boolean"):
        _C.Allocator("fake", size_classes=2)
    with pytest.raises(ValueError, match="'chunk_bytes' does not apply to upstream 'host'"):
        _C.Allocator("cpu", expandable_segments=False, chunk_bytes=1 << 20)
    with pytest.raises(ValueError, match="'reserve_bytes' does not apply to upstream 'fake'"):
        _C.Allocator("fake", reserve_bytes=1 << 30)
    with pytest.raises(ValueError, match="read by torchpool.install"):
        _C.Allocator("fake", publish=True)
    a = _C.Allocator("cpu", expandable_segments=False, max_reserved_ratio=0, alignment=256)
    assert a.upstream_name == "host_mmap"
    assert a.options["max_reserved_ratio"] == 0.0 and a.options["alignment"] == 256
    assert a.options["expandable_segments"] is False and "publish" not in a.options


def test_conf_from_the_environment_is_checked_by_the_same_rule(python_subprocess):
    r = python_subprocess("import torchpool", env={"TORCHPOOL_CONF": "cpu=1,max_reserved_ratio=0.5"})
    assert r.returncode != 0
    assert "max_reserved_ratio='0.5' is out of range; valid: 0 (off) or a number from 1 to 1000000" in r.stderr
    assert "TORCHPOOL_CONF" in r.stderr


def test_replay_mode_torchpool_is_exactly_what_install_builds(python_subprocess):
    r = python_subprocess(
        "import json, torchpool\n"
        "from torchpool import _C\n"
        "a = torchpool.install()\n"
        "modes = {m['name']: m for m in _C.replay_modes()}\n"
        "print(json.dumps({'install': a.options, 'upstream': a.upstream_name, 'modes': modes,\n"
        "                  'schema': torchpool.options()}))\n")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    modes, schema = out["modes"], {o["name"]: o for o in out["schema"]}
    assert modes["torchpool"]["device"] == "cpu"
    assert modes["torchpool"]["options"] == out["install"]  # the same values, from the same function
    assert out["upstream"] == "host_vmm" and out["install"]["expandable_segments"] is True
    for dev, mode in (("cpu", "torchpool"), ("cuda", "torchpool-cuda")):
        defaults = {n: o["default"][dev] for n, o in schema.items() if dev in o["devices"] and o["scope"] != "install"}
        assert {k: v for k, v in modes[mode]["options"].items() if k in defaults} == defaults, mode
    # every other mode is a device's defaults with what its name says changed
    changed = {m: {k: v for k, v in modes[m]["options"].items()
                   if v != modes["torchpool" if modes[m]["device"] == "cpu" else "torchpool-cuda"]["options"][k]}
               for m in modes}
    assert changed == {"torchpool": {}, "torchpool-cuda": {},
                       "torchpool-chunks-2m": {"chunk_bytes": 2 << 20},
                       "torchpool-segments": {"expandable_segments": False},
                       "torchpool-segments-no-target": {"expandable_segments": False, "max_reserved_ratio": 0.0},
                       "torchpool-bestfit": {"size_classes": False},
                       "torchpool-no-thread-cache": {"thread_cache": False},
                       "torchpool-cuda-expandable": {"expandable_segments": True}}
