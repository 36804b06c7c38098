"""Distributed checkpoint loading benchmark: torch.distributed.checkpoint's own
HuggingFaceStorageReader against torchpool.distributed.HFStorageReader, and parallel pread of the
files (the disk's limit), cold, under torchrun (gloo, CPU), 2 and 4 ranks, interleaved in one run.

    python bench/bench_distributed.py                      # 2 GB bf16 checkpoint in 4 shards, 2 and 4 ranks, 3 repeats
    python bench/bench_distributed.py --worlds 2 --repeats 5 --layout tp --dir /data/ck

Each case is one torchrun launch. Every rank builds its state dict first (DTensors on a 1-D CPU mesh:
--layout shard0 puts every tensor in Shard(0), as FSDP2 does; tp uses Shard(0) for q/k/v/gate/up,
Shard(1) for o/down, Replicate for embeddings, norms and the head), touches it, then all ranks pass a
barrier and the clock starts; it stops at the barrier after every rank's dcp.load returned.
"pread": each rank reads 1/N of every file with 8 threads of 8 MiB os.preadv into reused buffers
(2 ranks: 16 reads in flight, 4 ranks: 32): what the disk gives, with no destination to fill.
Storage read: the sum over ranks of /proc/self/io read_bytes (bytes the ranks made the disk read;
ranks on one host share the page cache, so a page is charged once, to whoever faulted it first),
and rchar (bytes read/pread returned to the ranks, cached or not).
Cold: `echo 3 > /proc/sys/vm/drop_caches` where this process may write it, else posix_fadvise
(DONTNEED) on every shard (as bench/bench_checkpoint.py; the table says which).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

READERS = ("dcp", "torchpool", "pread")
VARIANTS = ("torchpool-map", "torchpool-16", "pread-c")  # optional: HFStorageReader(mode="map"), readers=16,
# and "pread-c": the same ranges as "pread" read by torchpool's C++ reader threads (_C.read_direct, 8 MiB
# pieces) into one touched buffer per rank: parallel pread without Python threads, DCP or planning


def proc_io() -> dict:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


# ---------------------------------------------------------------- one rank
def worker(a):
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    idx = Path(a.index)
    files = sorted({idx.parent / v for v in json.loads(idx.read_text())["weight_map"].values()})
    res = {"rank": rank}
    if a.reader == "pread-c":
        import torch

        import torchpool  # noqa: F401
        from torchpool import _C

        shards = {p: _C.Shard(str(p)) for p in files}
        spans = []
        for p in files:
            n = p.stat().st_size
            per = -(-n // world)
            lo, hi = min(n, rank * per), min(n, (rank + 1) * per)
            if hi > lo:
                spans.append((p, lo, hi - lo))
        buf = torch.zeros(sum(s[2] for s in spans), dtype=torch.uint8)  # touched, as the state dicts are
        ops, at = [], buf.data_ptr()
        for p, lo, ln in spans:
            ops.append((shards[p], lo, ln, at, ""))
            at += ln
        io0 = proc_io()
        dist.barrier()
        t0 = time.perf_counter()
        _C.read_direct(ops, a.threads, 8 << 20)
        dist.barrier()
        t1 = time.perf_counter()
        res["requested"] = buf.numel()
    elif a.reader == "pread":
        work = []
        for p in files:
            n = p.stat().st_size
            per = -(-n // world)
            lo, hi = min(n, rank * per), min(n, (rank + 1) * per)
            work += [(p, off, min(8 << 20, hi - off)) for off in range(lo, hi, 8 << 20)]
        fds = {p: os.open(p, os.O_RDONLY) for p in files}
        lock = threading.Lock()
        it = iter(work)
        got = [0]

        def reader():
            buf = bytearray(8 << 20)
            mv = memoryview(buf)
            while True:
                with lock:
                    w = next(it, None)
                if w is None:
                    return
                p, off, ln = w
                n = os.preadv(fds[p], [mv[:ln]], off)
                with lock:
                    got[0] += n

        io0 = proc_io()
        dist.barrier()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=reader) for _ in range(a.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dist.barrier()
        t1 = time.perf_counter()
        res["requested"] = got[0]
    else:
        from safetensors import safe_open

        mesh = init_device_mesh("cpu", (world,))
        sd = {}
        for p in files:
            with safe_open(str(p), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    shape, dtype = sl.get_shape(), torch.bfloat16
                    if a.layout == "tp":
                        if any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                            pl = [Shard(0)]
                        elif any(k in name for k in ("o_proj", "down_proj")):
                            pl = [Shard(1)]
                        else:
                            pl = [Replicate()]
                    else:
                        pl = [Shard(0)]
                    # the local shard only (no full tensor), allocated and touched as a model's would be
                    lshape, _ = compute_local_shape_and_global_offset(shape, mesh, pl)
                    local = torch.zeros(lshape, dtype=dtype)
                    sd[name] = DTensor.from_local(local, mesh, pl, run_check=False, shape=torch.Size(shape),
                                                  stride=torch.empty(shape, device="meta").stride())
        if a.reader == "dcp":
            from torch.distributed.checkpoint import HuggingFaceStorageReader

            reader = HuggingFaceStorageReader(str(idx.parent), thread_count=a.dcp_threads)
        else:
            from torchpool.distributed import HFStorageReader

            mode = "map" if a.reader == "torchpool-map" else "auto"
            threads = 16 if a.reader == "torchpool-16" else a.threads
            reader = HFStorageReader(str(idx), readers=threads, mode=mode)
        io0 = proc_io()
        dist.barrier()
        t0 = time.perf_counter()
        dcp.load(sd, storage_reader=reader)
        dist.barrier()
        t1 = time.perf_counter()
        if a.reader.startswith("torchpool"):
            res["requested"] = reader.bytes_requested
            res["stats"] = reader.stats()
        # spot check: one local shard against safetensors (after the clock)
        name = sorted(sd)[len(sd) // 2]
        loc = sd[name].to_local()
        shp, off = compute_local_shape_and_global_offset(sd[name].shape, mesh, sd[name].placements)
        for p in files:
            with safe_open(str(p), framework="pt") as f:
                if name in f.keys():
                    ref = f.get_slice(name)[tuple(slice(o, o + s) for o, s in zip(off, shp))]
                    res["spot_check"] = bool(torch.equal(loc, ref))
    io1 = proc_io()
    res["time"] = t1 - t0
    res["read_bytes"] = io1["read_bytes"] - io0["read_bytes"]
    res["rchar"] = io1["rchar"] - io0["rchar"]
    Path(a.out).joinpath(f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


# ---------------------------------------------------------------- driver
def launch(a, reader: str, world: int, idx: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(Path(__file__).resolve()), "--worker", "--reader", reader, "--index", str(idx), "--out", out,
               "--threads", str(a.threads), "--dcp-threads", str(a.dcp_threads), "--layout", a.layout]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("TORCHPOOL_CONF", None)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
        if p.returncode != 0:
            raise SystemExit(f"{reader} x{world} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    return {
        "time": max(r["time"] for r in ranks),
        "read_bytes": sum(r["read_bytes"] for r in ranks),
        "rchar": sum(r["rchar"] for r in ranks),
        "requested": [r.get("requested") for r in ranks],
        "spot_check": all(r.get("spot_check", True) for r in ranks),
        "paths": ranks[0].get("stats", {}).get("boxes"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "torchpool_bench_dist_ck")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--readers", nargs="+", default=list(READERS), choices=READERS + VARIANTS)
    ap.add_argument("--threads", type=int, default=8, help="torchpool's reader threads, and pread's, per rank")
    ap.add_argument("--dcp-threads", type=int, default=8, help="HuggingFaceStorageReader(thread_count=)")
    ap.add_argument("--layout", choices=("shard0", "tp"), default="shard0")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", type=Path, help="write every run here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reader", help=argparse.SUPPRESS)
    ap.add_argument("--index", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)

    from bench_checkpoint import drop_caches, generate, resident, shard_files

    idx = generate(a.dir, a.gb)
    files = shard_files(idx)
    size = sum(p.stat().st_size for p in files)
    print(f"checkpoint: {idx} ({len(files)} shards, {size / 1e9:.2f} GB); layout {a.layout}; "
          f"{os.cpu_count()} cores; {a.repeats} repeats, readers interleaved", flush=True)
    runs = []
    for rep in range(a.repeats):
        for world in a.worlds:
            order = a.readers[rep % len(a.readers):] + a.readers[:rep % len(a.readers)]
            for reader in order:
                method = drop_caches(files)
                before = resident(files)
                r = launch(a, reader, world, idx)
                r.update(reader=reader, world=world, rep=rep, cold=method, resident_before=before)
                runs.append(r)
                print(f"  rep {rep} x{world} {reader:9s} {r['time']:.3f} s  {size / r['time'] / 1e9:.2f} GB/s  "
                      f"disk {r['read_bytes'] / size:.3f}x  rchar {r['rchar'] / size:.3f}x  "
                      f"resident before {before:.0%}  {method}  paths {r['paths']}  check {r['spot_check']}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(runs, indent=1))
    print()
    print("| ranks | reader | median s | min–max s | GB/s (median) | vs DCP | vs pread | disk read / checkpoint | rchar / checkpoint |")
    print("|---|---|---|---|---|---|---|---|---|")
    for world in a.worlds:
        med = {}
        for reader in a.readers:
            ts = [r["time"] for r in runs if r["world"] == world and r["reader"] == reader]
            med[reader] = statistics.median(ts)
        for reader in a.readers:
            sel = [r for r in runs if r["world"] == world and r["reader"] == reader]
            ts = [r["time"] for r in sel]
            m = med[reader]
            vs_dcp = f"{med['dcp'] / m:.2f}x" if "dcp" in med else ""
            vs_pread = f"{med['pread'] / m:.0%}" if "pread" in med else ""
            disk = statistics.median(r["read_bytes"] for r in sel) / size
            rchar = statistics.median(r["rchar"] for r in sel) / size
            print(f"| {world} | {reader} | {m:.3f} | {min(ts):.3f}–{max(ts):.3f} | {size / m / 1e9:.2f} | {vs_dcp} | "
                  f"{vs_pread} | {disk:.3f} | {rchar:.3f} |")
    # per-repeat ratios (each repeat's three runs are back to back)
    print()
    for world in a.worlds:
        ratios = []
        for rep in range(a.repeats):
            t = {r["reader"]: r["time"] for r in runs if r["world"] == world and r["rep"] == rep}
            if "torchpool" in t:
                ratios.append((t.get("dcp", float("nan")) / t["torchpool"], t.get("pread", float("nan")) / t["torchpool"]))
        print(f"x{world} per repeat: vs DCP " + ", ".join(f"{x:.2f}x" for x, _ in ratios)
              + "; of pread " + ", ".join(f"{y:.0%}" for _, y in ratios))


if __name__ == "__main__":
    main()
