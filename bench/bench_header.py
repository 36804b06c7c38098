"""Header parsing cost against the number of tensors (issue 11, item 4).

For each count N, a checkpoint of N small F32 tensors (names like the transformers layout) is
written in memory; timed: torchpool's native parse + validate (`_C.validate_bytes`, which also builds
the Python dict of the header), `open_checkpoint` on a file (what a user pays), and the safetensors
package's `safe_open` + `keys()` when it is installed. Sizes whose previous size took longer than
--max-seconds are skipped (a quadratic parser would take hours on 1M).

    python bench/bench_header.py                       # 10k, 40k, 100k, 1M
    python bench/bench_header.py --counts 10000 40000 --max-seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import sys
import tempfile
import time


def header_bytes(n: int, elems: int = 1) -> bytes:
    h = {}
    nb = 4 * elems
    for i in range(n):
        h[f"model.layers.{i // 10}.block.{i % 10}.weight"] = {"dtype": "F32", "shape": [elems],
                                                            "data_offsets": [i * nb, (i + 1) * nb]}
    text = json.dumps(h, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + b"\0" * (n * nb)


def timed(fn, repeat=1):
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        r = fn()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[10_000, 40_000, 100_000, 1_000_000])
    ap.add_argument("--max-seconds", type=float, default=60.0, help="skip larger counts once one case took longer")
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temporary directory)")
    args = ap.parse_args(argv)

    import torchpool
    from torchpool import _C

    try:
        from safetensors import safe_open
    except ImportError:
        safe_open = None
    print(f"{'tensors':>9} {'header MB':>9} {'native s':>9} {'open s':>9} {'safetensors s':>13} {'ratio open/st':>13}")
    slow = False
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for n in args.counts:
            if slow:
                print(f"{n:>9} skipped (a smaller count took more than {args.max_seconds:.0f} s)")
                continue
            data = header_bytes(n)
            hlen = struct.unpack("<Q", data[:8])[0]
            path = os.path.join(d, f"h{n}.safetensors")
            with open(path, "wb") as f:
                f.write(data)
            t_native, h = timed(lambda: _C.validate_bytes("mem", data))
            assert len(h["tensors"]) == n
            t_open, ck = timed(lambda: torchpool.open_checkpoint(path))
            assert len(ck) == n
            ck.close()
            t_st = None
            if safe_open is not None:
                def st():
                    with safe_open(path, framework="pt") as f:
                        return len(list(f.keys()))
                t_st, k = timed(st)
                assert k == n
            ratio = f"{t_open / t_st:13.1f}" if t_st else f"{'':>13}"
            st_s = f"{t_st:13.3f}" if t_st is not None else f"{'-':>13}"
            print(f"{n:>9} {hlen / 1e6:9.1f} {t_native:9.3f} {t_open:9.3f} {st_s} {ratio}", flush=True)
            slow = max(t_native, t_open) > args.max_seconds
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
