"""`torchpool inspect PATH`: shards, tensor count, dtypes, total bytes, the largest tensors, and
whether the checkpoint validates (exit status 0 when it does, 1 when it does not)."""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a .safetensors file, a directory of shards, or a model.safetensors.index.json")
    parser.add_argument("--top", type=int, default=10, help="how many of the largest tensors to list (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def describe(path) -> dict:
    from .reader import open_checkpoint

    with open_checkpoint(path) as ck:
        infos = [ck.info(n) for n in ck.keys()]
        by_dtype: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for i in infos:
            by_dtype[i.dtype][0] += 1
            by_dtype[i.dtype][1] += i.nbytes
        shards = []
        for k, p in enumerate(ck.shard_paths):
            mine = [i for i in infos if i.shard == k]
            shards.append({"path": str(p), "file_bytes": ck.shards[k].file_size, "tensors": len(mine),
                           "data_bytes": sum(i.nbytes for i in mine)})
        largest = sorted(infos, key=lambda i: (-i.nbytes, i.name))
        return {
            "path": str(path),
            "valid": True,
            "shards": shards,
            "tensors": len(infos),
            "total_bytes": sum(i.nbytes for i in infos),
            "dtypes": {d: {"tensors": c, "bytes": b} for d, (c, b) in sorted(by_dtype.items())},
            "largest": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape), "bytes": i.nbytes} for i in largest],
            "metadata": ck.metadata,
        }


def main(args) -> int:
    """Exit status 0 valid, 1 invalid; a reader that closes the pipe early (``| head``) ends it quietly."""
    try:
        status = _main(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # The reader is gone: point stdout at /dev/null so the interpreter's final flush cannot
        # raise again, and exit as a tool killed by SIGPIPE would (128 + 13).
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141


def _main(args) -> int:
    from .reader import CheckpointError

    try:
        d = describe(args.path)
    except CheckpointError as e:
        if args.json:
            print(json.dumps({"path": str(args.path), "valid": False, "error": str(e), "file": e.file,
                              "tensor": e.tensor, "rule": e.rule}))
        else:
            print(f"{args.path}: INVALID\n  {e}")
        return 1
    d["largest"] = d["largest"][: max(0, args.top)]
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    out = sys.stdout
    print(f"{d['path']}: valid safetensors checkpoint", file=out)
    print(f"  shards:  {len(d['shards'])}", file=out)
    for s in d["shards"]:
        print(f"    {s['path']}  {s['tensors']} tensors, {_fmt_bytes(s['data_bytes'])} of data, "
              f"{_fmt_bytes(s['file_bytes'])} file", file=out)
    print(f"  tensors: {d['tensors']}", file=out)
    print(f"  bytes:   {d['total_bytes']} ({_fmt_bytes(d['total_bytes'])})", file=out)
    print("  dtypes:  " + ", ".join(f"{k} x{v['tensors']} ({_fmt_bytes(v['bytes'])})" for k, v in d["dtypes"].items()), file=out)
    if d["metadata"]:
        print("  metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(d["metadata"].items())), file=out)
    if d["largest"]:
        print(f"  largest {len(d['largest'])}:", file=out)
        w = max(len(t["name"]) for t in d["largest"])
        for t in d["largest"]:
            print(f"    {t['name']:<{w}}  {t['dtype']:<6} {str(tuple(t['shape'])):<20} {_fmt_bytes(t['bytes'])}", file=out)
    return 0
