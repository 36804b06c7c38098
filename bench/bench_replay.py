"""Replay speed per allocator per suite trace, with pytest-benchmark.

    .venv/bin/python -m pytest bench/bench_replay.py --benchmark-only
    .venv/bin/python -m pytest bench/bench_replay.py --benchmark-only -k kv_decode --benchmark-columns=min,median,ops

Each benchmark round is one pass of the trace's allocs and frees against a fresh allocator: the
timed part of `torchpool bench fragmentation` (csrc/replay time_ops, which calls nothing but the
allocator), plus making the allocator and freeing what the trace left live, which pytest-benchmark's
clock also sees.
The benchmark's "ops" column is passes per second; extra_info carries the trace's operation count
and the derived Mops/s.  Allocators that are not installed (jemalloc, tcmalloc, mimalloc) are
skipped with the reason.  Not collected by the test run (tests/ is the testpath).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from torchpool.tracing import replay as R
from torchpool.tracing import trace as T

TRACES = sorted((Path(__file__).resolve().parent / "traces").glob("*.tptrace.gz"))
KNOWN = {a["name"]: a for a in R.allocators()}
_compiled: dict[Path, object] = {}


def _trace(path: Path):
    if path not in _compiled:
        _compiled[path] = R.compile_trace(T.load(path))
    return _compiled[path]


@pytest.mark.parametrize("allocator", list(KNOWN))
@pytest.mark.parametrize("trace", TRACES, ids=[p.name.split(".")[0] for p in TRACES])
def test_replay_speed(benchmark, trace, allocator):
    a = KNOWN[allocator]
    if not a["available"]:
        pytest.skip(f"{allocator}: {a['unavailable_reason']}")
    rt = _trace(trace)
    seconds = benchmark.pedantic(rt.time, args=(allocator,), kwargs={"repeats": 1}, rounds=5, iterations=1,
                                 warmup_rounds=1)
    ops = rt.info["allocs"] + rt.info["frees"]
    benchmark.extra_info.update({"ops": ops, "Mops_per_s_fastest": ops / benchmark.stats.stats.min / 1e6})
    assert seconds > 0
