"""The named notes (Note [Name]) are the design documentation: every reference must lead to a note that
exists, and the README's table of notes must list every note, so a newcomer finds them all from one place."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("csrc", "python", "tests", "bench", "scripts", "tools") for p in (ROOT / d).rglob("*")
           if p.suffix in {".h", ".cc", ".inc", ".py", ".sh"} and "__pycache__" not in p.parts and p.name != "test_notes.py"]
# Notes of other projects that ours cite by name.
EXTERNAL = {"Expandable Segments"}  # PyTorch's CUDACachingAllocator.cpp
# A note is defined as "Note [Name]" over a rule of dashes (in a comment or docstring), or inline as
# "Note [Name]: ..." for a short one; a name may wrap across comment lines where it is referenced.
DEFINITION = re.compile(r"Note \[([^\]]+)\]\s*\n\s*(?://|#)?\s*-{4,}|Note \[([^\]\n]+)\]:")
REFERENCE = re.compile(r"Note \[([^\]]+)\]")


def _name(raw: str) -> str:
    return re.sub(r"\s*\n\s*(?://|#)?\s*", " ", raw).strip()


def _readme_table() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("as named notes")
    return text[start:text.index("\n\n", text.index("| where | notes |", start))]


def _definitions() -> dict[str, list[str]]:
    defs: dict[str, list[str]] = {}
    for p in SOURCES:
        for dashed, inline in DEFINITION.findall(p.read_text(errors="replace")):
            defs.setdefault(dashed or inline, []).append(str(p.relative_to(ROOT)))
    return defs


def test_sources_define_notes():
    assert len(_definitions()) >= 40, "the definition pattern no longer matches the notes"


@pytest.mark.parametrize("where", ["sources", "docs"])
def test_every_reference_resolves(where):
    defs = _definitions()
    files = SOURCES if where == "sources" else [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    missing = {(str(p.relative_to(ROOT)), _name(n)) for p in files 
               for n in REFERENCE.findall(p.read_text(errors="replace")) if _name(n) not in defs and _name(n) not in EXTERNAL}
    assert not missing, f"references to notes that do not exist: {sorted(missing)}"


def test_readme_table_lists_every_note():
    table = _readme_table()
    unlisted = sorted(f"{n} ({where[0]})" for n, where in _definitions().items() if f"[{n}]" not in table)
    assert not unlisted, f"notes missing from the README's table of notes: {unlisted}"
    listed = {_name(n) for n in re.findall(r"\[([^\]]+)\]", table)}
    assert listed <= set(_definitions()), f"README lists notes that do not exist: {listed - set(_definitions())}"
