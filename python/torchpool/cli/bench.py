"""`torchpool bench fragmentation`: replay the trace suite (or given traces) against allocators.

    torchpool bench fragmentation                       # bench/traces/*.tptrace.gz, default allocators
    torchpool bench fragmentation --trace run.tptrace.gz --allocators torchpool,pytorch --json
    torchpool bench fragmentation --plot frag.png        # needs matplotlib

The suite is looked up in $TORCHPOOL_TRACES, then in the installed package (the wheel carries a copy of
bench/traces as torchpool/traces), then in the source tree's bench/traces (editable installs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..stats import fmt_bytes, format_table


def suite_dir() -> Path:
    env = os.environ.get("TORCHPOOL_TRACES")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]  # torchpool/ (this file is torchpool/cli/bench.py)
    for candidate in (package / "traces", package.parents[1] / "bench" / "traces"):
        if any(candidate.glob("*.tptrace.gz")):
            return candidate
    return package / "traces"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True)
    f = sub.add_parser("fragmentation", help="replay allocation traces against allocators and report fragmentation")
    f.add_argument("--trace", action="append", default=[], metavar="FILE",
                   help="a trace (torchpool, RMM CSV or PyTorch snapshot pickle); repeatable; default: the suite")
    f.add_argument("--allocators", default=None, help="comma-separated names (default: all available)")
    f.add_argument("--json", action="store_true", help="print one JSON list of rows instead of the table")
    f.add_argument("--plot", default=None, metavar="OUT.png", help="draw live vs reserved bytes over time and each allocator's segment map at its peak")
    f.add_argument("--repeats", type=int, default=3, help="timed passes per allocator (fastest counts)")
    # Note [Trace limits] (tracing/trace.py) and Note [Replay input bounds] (csrc/replay/replay.h).
    from ..tracing.trace import DEFAULT_LIMITS

    lim = f.add_argument_group("limits (what a trace file may make torchpool allocate)")
    lim.add_argument("--max-trace-bytes", type=_byte_count, default=DEFAULT_LIMITS.max_bytes, metavar="N",
                     help=f"most bytes a trace may decompress to (default {fmt_bytes(DEFAULT_LIMITS.max_bytes)})")
    lim.add_argument("--max-trace-events", type=_byte_count, default=DEFAULT_LIMITS.max_events, metavar="N",
                     help=f"most events of one trace (default {DEFAULT_LIMITS.max_events})")
    lim.add_argument("--max-trace-header-bytes", type=_byte_count, default=DEFAULT_LIMITS.max_header_bytes, metavar="N",
                     help=f"most bytes of a torchpool trace's JSON header (default {fmt_bytes(DEFAULT_LIMITS.max_header_bytes)})")
    lim.add_argument("--max-trace-pickle-bytes", type=_byte_count, default=DEFAULT_LIMITS.max_pickle_bytes, metavar="N",
                     help=f"most bytes of a PyTorch snapshot pickle (default {fmt_bytes(DEFAULT_LIMITS.max_pickle_bytes)})")
    lim.add_argument("--max-replay-bytes", type=_byte_count, default=None, metavar="N",
                     help="most real memory a replay against a system allocator may write (default 2 GiB)")


def _byte_count(text: str) -> int:
    """An integer, optionally with a K/M/G/T suffix (powers of 1024): 512M, 4G, 1073741824."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t[-1:] in ("K", "M", "G", "T"):
        mult = 1 << (10 * ("KMGT".index(t[-1]) + 1))
        t = t[:-1]
    try:
        v = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 4G, 512M, 1073741824)") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return v


def run(traces: list[Path], names: list[str] | None, repeats: int, timeline: int = 0, snapshots: bool = False,
        limits=None, max_replay_bytes: int | None = None):
    from ..tracing import replay, trace

    ok, skipped = replay.available(names)
    rows = []
    for path in traces:
        t = trace.load(path, limits=limits)
        rows += replay.replay(t, ok, repeats=repeats, timeline_points=timeline, snapshots=snapshots,
                              max_replay_bytes=max_replay_bytes)
    return rows, skipped


def format_rows(rows: list[dict], skipped: dict[str, str] | None = None) -> str:
    """The fragmentation table (one line per trace and allocator), then a line per skipped allocator."""
    table = []
    for r in rows:
        ef = r["external_fragmentation"]
        table.append([r["trace"], r["allocator"], fmt_bytes(r["peak_live_bytes"]), fmt_bytes(r["peak_reserved_bytes"]),
                      f"{r['utilization']:.1%}" if r["utilization"] else "-", fmt_bytes(r["internal_waste_bytes"]),
                      "-" if ef is None else f"{ef:.1%}", "-" if r["upstream_calls"] is None else r["upstream_calls"],
                      f"{r['ops_per_s'] / 1e6:.2f}"])
    text = format_table(["trace", "allocator", "peak live", "peak reserved", "utilization", "internal waste",
                         "ext. frag", "upstream calls", "Mops/s"], table)
    for n, why in (skipped or {}).items():
        text += f"\nskipped {n}: {why}"
    return text


def main(args: argparse.Namespace) -> int:
    if args.bench != "fragmentation":
        return 2
    from ..tracing import replay

    names = [n.strip() for n in args.allocators.split(",")] if args.allocators else None
    try:
        replay.available(names)  # unknown names fail before any trace is read
    except ValueError as e:
        print(f"torchpool bench: {e}", file=sys.stderr)
        return 2
    traces = [Path(t) for t in args.trace] or sorted(suite_dir().glob("*.tptrace.gz"))
    if not traces:
        print(f"torchpool bench: no traces given and none in {suite_dir()}", file=sys.stderr)
        return 2
    from ..tracing.trace import TraceLimits

    limits = TraceLimits(max_bytes=args.max_trace_bytes, max_events=args.max_trace_events,
                         max_header_bytes=args.max_trace_header_bytes, max_pickle_bytes=args.max_trace_pickle_bytes)
    try:
        rows, skipped = run(traces, names, args.repeats, timeline=400 if args.plot else 0,
                            snapshots=bool(args.plot), limits=limits, max_replay_bytes=args.max_replay_bytes)
    except ValueError as e:
        print(f"torchpool bench: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([replay.public(r) for r in rows]))
    else:
        print(format_rows(rows, skipped))
    if args.plot:
        from ..tracing.plots import plot_timelines

        plot_timelines(rows, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0
