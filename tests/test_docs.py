"""The documentation holds together: every relative link of README.md and docs/ points at a file that
exists; every repository path a page names in backquotes exists; reference pages carry no dated
measurements (those live in docs/measurements/YYYY-MM-DD-*.md); every statistic memory_stats() returns
and memory_snapshot() field is described in docs/reference/statistics.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# `python/torchpool/x.py`, `csrc/core/pool.h`, `tests/...`, `bench/...`, `docs/...`, `scripts/...`
PATH = re.compile(r"`((?:python|csrc|tests|bench|docs|scripts|tools)/[A-Za-z0-9_./-]+)`")


def _prose(text: str) -> str:
    """The page without its fenced code blocks (program output and code are not links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(page.read_text()))
            if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    missing = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(page):
    named = PATH.findall(_prose(page.read_text()))
    missing = sorted({p for p in named if not (ROOT / p.rstrip("/")).exists() and not any(ch in p for ch in "*<")})
    assert not missing, f"{page.relative_to(ROOT)}: names paths that do not exist: {missing}"


def test_the_link_check_sees_links():
    """The checker is not vacuous: the README links into docs/ and a broken link is caught."""
    readme_links = relative_links(ROOT / "README.md")
    assert any(t.startswith("docs/reference/") for t in readme_links), readme_links
    assert any(t.startswith("docs/measurements/") for t in readme_links), readme_links
    assert LINK.findall("see [x](docs/nope.md)") == ["docs/nope.md"]


def test_measurement_logs_are_dated():
    logs = sorted((ROOT / "docs" / "measurements").glob("*.md"))
    assert logs
    for p in logs:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d-[a-z0-9-]+\.md", p.name), p.name


def test_reference_pages_link_their_measurements_and_hold_no_dated_runs():
    for page in sorted((ROOT / "docs" / "reference").glob("*.md")):
        text = LINK.sub("", _prose(page.read_text()))  # links name the dated logs
        dated = re.findall(r"\b20\d\d-\d\d-\d\d\b", text)
        assert not dated, f"{page.name}: a reference page names dates {dated}: a measurement belongs in docs/measurements/"


def test_every_memory_stats_key_is_described(python_subprocess):
    """docs/reference/statistics.md names every key torchpool.memory_stats() returns (the .all.current /
    .peak / .allocated / .freed suffixes of a gauge once) and every per-size-class field."""
    r = python_subprocess(
        "import json, torch, torchpool\n"
        "torchpool.install(); x = torch.empty(100); y = torch.empty(1 << 20); del x\n"
        "s = torchpool.memory_stats()\n"
        "snap = torchpool.memory_snapshot()\n"
        "print(json.dumps({'keys': sorted(s), 'class': sorted(s['size_classes'][0]) if s['size_classes'] else [],\n"
        "                  'segment': sorted({k for g in snap for k in g}),\n"
        "                  'block': sorted({k for g in snap for b in g['blocks'] for k in b})}))\n")
    assert r.returncode == 0, r.stderr
    import json

    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["class"], "no size class in use: the per-class fields were not checked"
    text = (ROOT / "docs" / "reference" / "statistics.md").read_text()
    described = set(re.findall(r"`([a-z_]+)(?:\.all\.\w+)?`", text))
    gauges = {re.sub(r"\.all\.(current|peak|allocated|freed)$", "", k) for k in got["keys"]}
    assert gauges - described == set(), "memory_stats() keys not in docs/reference/statistics.md"
    assert set(got["class"]) - described == set(), "size_classes fields not in docs/reference/statistics.md"
    assert got["segment"] and got["block"]
    assert set(got["segment"]) - described == set(), "memory_snapshot() segment fields not in statistics.md"
    assert set(got["block"]) - described == set(), "memory_snapshot() block fields not in statistics.md"
