"""Replay traces against allocators (the C++ engine in csrc/replay) and turn the results into rows.

    from torchpool.tracing import trace, replay
    rows = replay.replay(trace.load("bench/traces/gpt_train.tptrace.gz"), ["torchpool", "pytorch"])

Each row: trace, allocator, peak_live_bytes, peak_reserved_bytes, utilization, internal_waste_bytes,
external_fragmentation, upstream_calls, ops_per_s (Note [Measures] in csrc/replay/replay.h and
docs/reference/fragmentation.md say exactly what each one is).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from .._build import _C
from .trace import Trace, TraceFormatError, TraceLimitError

# Note [Replay input bounds] (csrc/replay/replay.h): system allocators write every page they hand
# out, so a replay against them is refused when the trace's peak live bytes exceed this.
DEFAULT_MAX_REPLAY_BYTES = int(_C.replay_default_max_system_bytes)

# The allocators a report shows by default, in this order.
DEFAULT_ALLOCATORS = ["torchpool", "torchpool-chunks-2m", "torchpool-segments", "torchpool-segments-no-target", "pytorch",
                      "pytorch-expandable",
                      "glibc", "jemalloc", "tcmalloc", "mimalloc"]
ROW_KEYS = ["trace", "allocator", "peak_live_bytes", "peak_reserved_bytes", "utilization", "internal_waste_bytes",
            "external_fragmentation", "upstream_calls", "ops_per_s"]


def allocators() -> list[dict]:
    """Every allocator the replay knows: name, kind, description, available, unavailable_reason."""
    return _C.replay_allocators()


# Note [Static TLS for system allocators]
# ---------------------------------------
# Rationale: jemalloc is built with initial-exec TLS; dlopen can place it only in the spare static
# TLS that glibc sets aside at process start, and after torch's libraries there is none left
# ("cannot allocate memory in static TLS block"), so jemalloc was skipped on every fresh machine.
# Approach: only a process start can grant more (GLIBC_TUNABLES=glibc.rtld.optional_static_tls);
# the child interpreters that measure system allocators (Note [Measuring system allocators]) start
# with it (_child_env), and an allocator that this process cannot load for lack of static TLS is
# probed once in such a child; if it loads there it is available, and it is measured and timed
# only in children.
_STATIC_TLS = "glibc.rtld.optional_static_tls=16384"
_child_only: set[str] = set()
_probed: dict[str, str | None] = {}


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("TORCHPOOL_CONF", None)
    tun = env.get("GLIBC_TUNABLES", "")
    if "optional_static_tls" not in tun:
        env["GLIBC_TUNABLES"] = (tun + ":" if tun else "") + _STATIC_TLS
    return env


def _probe_in_child(name: str) -> str | None:
    """None if `name` loads in a child started with spare static TLS, else why not."""
    if name not in _probed:
        r = subprocess.run([sys.executable, "-m", "torchpool.tracing.replay", "--probe", name], capture_output=True,
                           text=True, env=_child_env())
        _probed[name] = None if r.returncode == 0 and r.stdout.strip() == "ok" else (r.stdout + r.stderr).strip()
    return _probed[name]


def available(names: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(the names that can run, {name: why not} for the others). Unknown names raise ValueError."""
    known = {a["name"]: a for a in allocators()}
    names = list(names) if names else DEFAULT_ALLOCATORS
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown allocator(s) {', '.join(unknown)}; known: {', '.join(known)}")
    ok, skipped = [], {}
    for n in names:
        a = known[n]
        if a["available"]:
            ok.append(n)
        elif a["kind"] == "system" and "static TLS" in a["unavailable_reason"]:
            why = _probe_in_child(n)  # Note [Static TLS for system allocators]
            if why is None:
                _child_only.add(n)
                ok.append(n)
            else:
                skipped[n] = f"{a['unavailable_reason']}; in a child with GLIBC_TUNABLES={_STATIC_TLS}: {why}"
        else:
            skipped[n] = a["unavailable_reason"]
    return ok, skipped


def _where(trace: Trace) -> str:
    return trace.path or trace.name


def compile_trace(trace: Trace):
    """The trace compiled for replay; TraceFormatError naming the trace and record for what the replay
    refuses (Note [Replay input bounds] in csrc/replay/replay.h)."""
    try:
        return _C.ReplayTrace(trace.to_bytes())
    except _C.ReplayInputError as e:
        raise TraceFormatError(f"{_where(trace)}: cannot replay: {e}") from None


def check_replay_limit(trace: Trace, compiled, name: str, kind: str, max_replay_bytes: int) -> None:
    """TraceLimitError when replaying `trace` against a system allocator would write more than
    max_replay_bytes of real memory."""
    peak = compiled.info["peak_live_bytes"]
    if kind == "system" and peak > max_replay_bytes:
        raise TraceLimitError(
            f"{_where(trace)}: replaying it against {name} would write {peak} bytes of real memory (its peak live "
            f"bytes), more than the limit max_replay_bytes={max_replay_bytes} (Note [Replay input bounds]); if you "
            "mean it, raise it: torchpool.replay.replay(..., max_replay_bytes=N) or "
            "`torchpool bench fragmentation --max-replay-bytes N`")


def _kinds() -> dict[str, str]:
    return {a["name"]: a["kind"] for a in allocators()}


def measure_isolated(records: bytes, name: str, timeline_points: int = 0,
                     max_replay_bytes: int = DEFAULT_MAX_REPLAY_BYTES, repeats: int = 0) -> dict:
    """rt.measure(name) in a fresh interpreter: system allocators' memory depends on what the process
    did before (Note [Measuring system allocators] in csrc/replay/system.cc).  repeats > 0: the result
    also has "seconds", rt.time(name, repeats) in that interpreter."""
    with tempfile.NamedTemporaryFile(prefix="torchpool-replay-", suffix=".bin", delete=False) as f:
        f.write(records)
    try:
        r = subprocess.run([sys.executable, "-m", "torchpool.tracing.replay", f.name, name, str(timeline_points),
                            str(max_replay_bytes), str(repeats)],
                           capture_output=True, text=True, env=_child_env())
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        raise RuntimeError(f"torchpool.replay: measuring {name} in a fresh interpreter failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def replay(trace: Trace, names: list[str] | None = None, repeats: int = 3, timeline_points: int = 0,
           compiled=None, isolate: bool = True, snapshots: bool = False,
           max_replay_bytes: int | None = None) -> list[dict]:
    """Measure and time `trace` against each allocator in `names` (default: DEFAULT_ALLOCATORS that are
    available).  With timeline_points > 0 each row also has "timeline": [(op, live, reserved)].
    isolate: measure system allocators (glibc, jemalloc, ...) each in a fresh interpreter.
    snapshots: also give each row "_extra"["segments_at_peak"], the allocator's segments and blocks at
    its peak reserved (torchpool modes and the PyTorch emulation; [] where not observable).
    max_replay_bytes: the most real memory a replay against a system allocator may write (default
    DEFAULT_MAX_REPLAY_BYTES, 2 GiB); a trace that needs more raises TraceLimitError before anything runs."""
    ok, _ = available(names)
    limit = DEFAULT_MAX_REPLAY_BYTES if max_replay_bytes is None else int(max_replay_bytes)
    if limit < 0:
        raise ValueError(f"max_replay_bytes must be >= 0, got {max_replay_bytes!r}")
    rt = compiled or compile_trace(trace)
    kinds = _kinds()
    for name in ok:
        check_replay_limit(trace, rt, name, kinds[name], limit)
    rows = []
    for name in ok:
        if name in _child_only:  # Note [Static TLS for system allocators]: measured and timed in a child
            m = measure_isolated(trace.to_bytes(), name, timeline_points, limit, repeats=max(1, repeats))
            seconds = m["seconds"]
        else:
            if isolate and kinds[name] == "system":
                m = measure_isolated(trace.to_bytes(), name, timeline_points, limit)
            else:
                m = rt.measure(name, timeline_points=timeline_points, max_system_bytes=limit)
            seconds = rt.time(name, repeats=repeats, max_system_bytes=limit)
        ops = m["allocs"] + m["frees"]
        row = {
            "trace": trace.name,
            "allocator": name,
            "peak_live_bytes": m["peak_live_bytes"],
            "peak_reserved_bytes": m["peak_reserved_bytes"],
            "utilization": m["peak_live_bytes"] / m["peak_reserved_bytes"] if m["peak_reserved_bytes"] else None,
            "internal_waste_bytes": m["internal_waste_bytes"],
            "external_fragmentation": m["external_fragmentation"],
            "upstream_calls": m["upstream_calls"],
            "ops_per_s": ops / seconds if seconds > 0 else None,
        }
        extra = {"ops": ops, "ooms": m["ooms"], "peak_reserved_op": m["peak_reserved_op"],
                 "reserved_samples": m["reserved_samples"]}
        if timeline_points:
            extra["timeline"] = m["timeline"]
        if snapshots:
            extra["segments_at_peak"] = ([] if kinds[name] == "system"
                                         else rt.snapshot_at(name, m["peak_reserved_op"]))
        row["_extra"] = extra
        rows.append(row)
    return rows


def public(row: dict) -> dict:
    """The row as --json prints it (the documented keys only)."""
    return {k: row.get(k) for k in ROW_KEYS}


def _child(argv: list[str]) -> int:
    if argv[:1] == ["--probe"]:
        a = next(a for a in allocators() if a["name"] == argv[1])
        print("ok" if a["available"] else a["unavailable_reason"])
        return 0
    path, name, points, limit, repeats = argv
    with open(path, "rb") as f:
        rt = _C.ReplayTrace(f.read())
    m = rt.measure(name, timeline_points=int(points), max_system_bytes=int(limit))
    if int(repeats) > 0:
        m["seconds"] = rt.time(name, repeats=int(repeats), max_system_bytes=int(limit))
    m["timeline"] = [list(x) for x in m["timeline"]]
    print(json.dumps(m))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
