"""`torchpool top`: every process on this machine that uses torchpool, refreshed every second.

    torchpool top                 # a live table, like nvidia-smi / nvtop (Ctrl-C to quit)
    torchpool top --once          # one table
    torchpool top --once --json   # [{"pid", "command", "user", "device", "updated", "memory_stats": {...}}]

Processes publish their counters in a small shared-memory page (Note [Published counters],
csrc/torch_glue/publish.h): on by default once torchpool is installed, off with the option
publish=0 (``torchpool.install(publish=0)``, ``TORCHPOOL_CONF=cpu=1,publish=0``).  Pages live in a
per-user directory, /dev/shm/torchpool-<uid> (TORCHPOOL_PUBLISH_DIR overrides it), mode 0700: a user
sees their own processes, root sees everyone's.  Pages of processes that are gone are removed.
"""

from __future__ import annotations

import argparse
import atexit
import glob
import json
import os
import pwd
import struct
import sys
import time

from .._build import _C
from ..stats import derive, fmt_bytes, format_table

MAGIC = b"TPPAGE1\0"
_state = {"enabled": False, "hooked": False}


def page_dir(uid: int | None = None) -> str:
    env = os.environ.get("TORCHPOOL_PUBLISH_DIR")
    if env:
        return env
    return f"/dev/shm/torchpool-{os.geteuid() if uid is None else uid}"


# ---- publishing (this process) ----

def start_publishing(interval_ms: int = 250) -> bool:
    """Publish this process's counters (idempotent).  Returns False, saying why under
    TORCHPOOL_VERBOSE, when the page cannot be made (no /dev/shm, a directory owned by someone else)."""
    _state["enabled"] = True
    if not _state["hooked"]:
        _state["hooked"] = True
        os.register_at_fork(after_in_child=_after_fork_in_child)
        atexit.register(stop_publishing)
    d = page_dir()
    why = _C.monitor.publish_start(d, int(interval_ms))
    if why:
        if os.environ.get("TORCHPOOL_VERBOSE"):
            print(f"torchpool: not publishing counters for `torchpool top`: {why}", file=sys.stderr)
        return False
    try:
        read_pages([d])  # removes the pages of processes that are gone
    except OSError:
        pass
    return True


def stop_publishing() -> None:
    _state["enabled"] = False
    _C.monitor.publish_stop(True)


def set_publishing(on: bool) -> None:
    """install()'s publish option."""
    if on:
        start_publishing()
    elif _C.monitor.publishing():
        stop_publishing()


def _after_fork_in_child() -> None:
    # The C++ side dropped the parent's page (pthread_atfork); the child publishes its own.
    if _state["enabled"]:
        start_publishing()


# ---- reading (any process) ----

def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rfind(b")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else None


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _read_page(path: str) -> tuple[dict, str] | None:
    """(header, body) read under the seqlock, or None for a file that is not a page."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for _ in range(50):
            s1 = os.pread(fd, 8, 8)
            data = os.pread(fd, int(_C.monitor.page_bytes), 0)
            s2 = os.pread(fd, 8, 8)
            if len(data) < 64 or data[:8] != MAGIC:
                return None
            if s1 == s2 and struct.unpack("<Q", s1)[0] % 2 == 0:
                _, seq, pid, start, updated, length, version = struct.unpack_from("<8sQQQQII", data)
                body = data[64:64 + length].decode(errors="replace")
                return {"pid": pid, "start_time": start, "updated_ns": updated, "seq": seq, "version": version}, body
            time.sleep(0.001)
        return None
    finally:
        os.close(fd)


def _parse_body(body: str) -> dict[str, dict]:
    devices: dict[str, dict] = {}
    cur = None
    for line in body.splitlines():
        key, _, value = line.partition("=")
        if key == "device":
            cur = devices.setdefault(value, {})
        elif cur is not None and value:
            try:
                cur[key] = int(value)
            except ValueError:
                continue
    return devices


def _dirs() -> list[str]:
    if os.environ.get("TORCHPOOL_PUBLISH_DIR"):
        return [os.environ["TORCHPOOL_PUBLISH_DIR"]]
    if os.geteuid() == 0:
        return sorted(glob.glob("/dev/shm/torchpool-*"))
    return [page_dir()]


def read_pages(dirs: list[str] | None = None) -> list[dict]:
    """One dict per (process, device) with a live page: pid, command, user, device, updated (epoch
    seconds), memory_stats (the counters plus utilization, external_fragmentation, ...).  Pages of
    dead processes (or of a pid reused since) are removed."""
    me = os.geteuid()
    out = []
    for d in dirs or _dirs():
        try:
            st = os.lstat(d)
            names = os.listdir(d)
        except OSError:
            continue
        if me != 0 and st.st_uid != me:
            continue  # another user's processes: shown to that user and root only
        for name in names:
            if not name.isdigit():
                continue
            path = os.path.join(d, name)
            try:
                fst = os.lstat(path)
                if me != 0 and fst.st_uid != me:
                    continue
                page = _read_page(path)
            except OSError:
                continue
            if page is None:
                continue
            head, body = page
            pid = int(name)
            if head["pid"] != pid or _start_time(pid) != head["start_time"]:
                try:
                    os.unlink(path)  # its process is gone
                except OSError:
                    pass
                continue
            try:
                user = pwd.getpwuid(fst.st_uid).pw_name
            except KeyError:
                user = str(fst.st_uid)
            for dev, raw in _parse_body(body).items():
                try:
                    stats = derive(raw)
                except KeyError:
                    stats = raw
                out.append({"pid": pid, "command": _command(pid), "user": user, "device": dev,
                            "updated": head["updated_ns"] / 1e9, "memory_stats": stats})
    out.sort(key=lambda r: (r["pid"], r["device"]))
    return out


def format_top(rows: list[dict]) -> str:
    if not rows:
        return "no process is publishing torchpool counters (torchpool installed, publish=1) for this user"
    table = []
    for r in rows:
        s = r["memory_stats"]
        cmd = r["command"]
        table.append([r["pid"], r["user"], cmd if len(cmd) <= 40 else cmd[:37] + "...", r["device"],
                      fmt_bytes(s["allocated_bytes.all.current"]), fmt_bytes(s["allocated_bytes.all.peak"]),
                      fmt_bytes(s["reserved_bytes.all.current"]), fmt_bytes(s["reserved_bytes.all.peak"]),
                      f"{s.get('utilization', 0):.1%}", f"{s.get('external_fragmentation', 0):.1%}", s.get("num_ooms", 0)])
    return format_table(["pid", "user", "command", "device", "allocated", "peak alloc", "reserved", "peak resv",
                         "util", "ext frag", "OOMs"], table)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--once", action="store_true", help="print once and exit")
    p.add_argument("--json", action="store_true", help="JSON: a list of {pid, command, user, device, memory_stats}")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")


def main(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise SystemExit("torchpool top: --interval must be positive")
    while True:
        rows = read_pages()
        if args.json:
            print(json.dumps(rows), flush=True)
        else:
            if not args.once:
                print("\033[H\033[2J", end="")
                print(f"torchpool top - {time.strftime('%H:%M:%S')} - {len(rows)} device(s)\n")
            print(format_top(rows), flush=True)
        if args.once:
            return 0
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0
