"""The `torchpool` command: one subcommand per module, each with add_arguments(parser) and main(args).

    launch.py            torchpool run: a script or module with torchpool installed from its first line
    top.py               torchpool top: every process using torchpool (and the counters it publishes)
    bench.py             torchpool bench fragmentation: the trace suite replayed (torchpool.tracing)
    demo.py              torchpool demo, and its steps: loader_demo.py, fragmentation_demo.py, leak_demo.py
    workloads.py         the demo's (and bench/'s) real PyTorch workloads
    inspect              lives with the checkpoints: torchpool.checkpoint.inspect
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, help). A subcommand whose module is not in this build is left out.
COMMANDS = {
    "demo": ("torchpool.cli.demo", "swap the allocator, run a real workload, print the report"),
    "run": ("torchpool.cli.launch", "run a Python script or module with torchpool installed from its first line"),
    "inspect": ("torchpool.checkpoint.inspect", "describe and validate a safetensors checkpoint"),
    "bench": ("torchpool.cli.bench", "benchmarks (fragmentation replay)"),
    "top": ("torchpool.cli.top", "every process using torchpool: allocated, reserved, peaks, fragmentation, OOMs"),
}


def version_string() -> str:
    """torchpool's version and the torch it was built against (allocators have no stable ABI)."""
    from .. import __version__
    from .._build import _C

    return f"torchpool {__version__} (built against torch {_C.built_with_torch})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchpool", description="control of tensor memory for PyTorch")
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is None:
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":  # the script's own options must reach the script untouched
        from . import launch

        return int(launch.main(launch.split_argv(argv[1:])) or 0)
    args = build_parser().parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
