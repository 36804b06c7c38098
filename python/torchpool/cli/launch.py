"""`torchpool run [--conf C] script.py args...` / `torchpool run -m module args...`.

Installs torchpool first, then runs the script in this interpreter as __main__, so the allocator
is swapped before the script's first line. TORCHPOOL_CONF is set for child processes too (a
spawned DataLoader worker that imports torchpool installs it the same way).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from .. import _config
from .._install import install


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf", default=None,
                   help="TORCHPOOL_CONF-style options, e.g. 'cpu=1,max_cached_mb=4096' (default: $TORCHPOOL_CONF or cpu=1)")
    p.add_argument("-m", dest="module", default=None, help="run a library module as a script (like python -m)")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="script.py and its arguments (or the module's arguments)")


def split_argv(argv: list[str]) -> argparse.Namespace:
    """Parse `run`'s own options, stopping at the script or module: everything after it, --help
    included, belongs to the script (argparse.REMAINDER would take --help for itself)."""
    conf, module, i = None, None, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            p = argparse.ArgumentParser(prog="torchpool run", description=__doc__.splitlines()[0])
            add_arguments(p)
            p.print_help()
            raise SystemExit(0)
        if arg == "--conf" and i + 1 < len(argv):
            conf, i = argv[i + 1], i + 2
        elif arg.startswith("--conf="):
            conf, i = arg.split("=", 1)[1], i + 1
        elif arg == "-m" and i + 1 < len(argv):
            module, i = argv[i + 1], i + 2
            break
        elif arg == "--":
            i += 1
            break
        else:
            break
    return argparse.Namespace(conf=conf, module=module, argv=argv[i:])


def main(args: argparse.Namespace) -> int:
    conf = args.conf if args.conf is not None else (os.environ.get("TORCHPOOL_CONF") or "cpu=1")
    try:
        devices, options = _config.parse_conf(conf)  # the same rules as TORCHPOOL_CONF at import
    except _config.ConfigError as e:
        raise SystemExit(f"torchpool run: {e} (from --conf {conf!r})" if args.conf is not None
                         else f"torchpool run: {e} (from TORCHPOOL_CONF={conf!r})") from None
    if not devices:
        raise SystemExit("torchpool run: the configuration names no device (add cpu=1 or cuda=1)")
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if args.module is None and not argv:
        raise SystemExit("torchpool run: give a script (torchpool run script.py ...) or -m module")
    for dev in devices:
        install(dev, **options)
    os.environ["TORCHPOOL_CONF"] = conf
    if args.module is not None:
        sys.argv = [args.module, *argv]
        # As `python -m`: the working directory comes first on sys.path, so `-m my_package.train`
        # finds the package it is run next to.
        sys.path.insert(0, os.getcwd())
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    else:
        script = argv[0]
        if not os.path.exists(script):
            raise SystemExit(f"torchpool run: no such script: {script}")
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")
    return 0
