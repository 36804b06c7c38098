"""Checkpoint loading benchmark: torchpool's loader against the safetensors package, one run each,
interleaved, cold (page cache dropped) and warm.

    python bench/bench_checkpoint.py                    # ~2 GB bf16 Llama-style checkpoint in 4 shards
    python bench/bench_checkpoint.py --gb 8.2 --dir /data/bench_ck

Cold: `echo 3 > /proc/sys/vm/drop_caches` when this process may write it (root outside a container);
otherwise every shard is fsync'ed and evicted with posix_fadvise(POSIX_FADV_DONTNEED), which drops
clean page-cache pages of those files just as well (the table says which was used, and the resident
fraction measured with mincore right before each cold case). Every case runs in a fresh Python process
so that peak RSS, private (anonymous) and file-backed memory are its own; they are sampled every 5 ms
from /proc/self/status (RssAnon, RssFile) and VmHWM.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

HIDDEN, INTER, VOCAB = 2048, 5632, 32000


def layers_for(gb: float) -> int:
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN) * 2
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * 2
    return max(1, round((gb * 1e9 - fixed) / per_layer))


# ---------------------------------------------------------------- checkpoint generation (streaming)
def generate(directory: Path, gb: float, shards: int = 4) -> Path:
    import torch

    from checkpoint_gen import llama_like

    layers = layers_for(gb)
    idx = directory / "model.safetensors.index.json"
    stamp = directory / "bench.json"
    want = {"layers": layers, "hidden": HIDDEN, "inter": INTER, "vocab": VOCAB, "shards": shards}
    if idx.exists() and stamp.exists() and json.loads(stamp.read_text()) == want:
        return idx
    directory.mkdir(parents=True, exist_ok=True)
    # names and shapes from the tests' generator (tiny instance), sizes from the bench config
    names = list(llama_like(layers=layers, hidden=2, inter=2, vocab=2))

    def shape(name):
        if "embed_tokens" in name or "lm_head" in name:
            return (VOCAB, HIDDEN)
        if "norm" in name:
            return (HIDDEN,)
        if "gate_proj" in name or "up_proj" in name:
            return (INTER, HIDDEN)
        if "down_proj" in name:
            return (HIDDEN, INTER)
        return (HIDDEN, HIDDEN)

    sizes = {n: 2 * (shape(n)[0] * (shape(n)[1] if len(shape(n)) > 1 else 1)) for n in names}
    total = sum(sizes.values())
    per = -(-total // shards)
    parts, acc, k = [[] for _ in range(shards)], 0, 0
    for n in names:
        if acc >= per * (k + 1) and k < shards - 1:
            k += 1
        parts[k].append(n)
        acc += sizes[n]
    block = (torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    block_bytes = block.view(torch.uint8).numpy().tobytes()
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for n in part:
            header[n] = {"dtype": "BF16", "shape": list(shape(n)), "data_offsets": [off, off + sizes[n]]}
            off += sizes[n]
            weight_map[n] = fname
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        with open(directory / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            for n in part:
                left = sizes[n]
                if "norm" in n:
                    f.write(b"\x80\x3f" * (left // 2))  # bf16 1.0
                    continue
                while left:
                    c = min(left, len(block_bytes))
                    f.write(block_bytes[:c])
                    left -= c
            f.flush()
            os.fsync(f.fileno())
    idx.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    stamp.write_text(json.dumps(want))
    return idx


def shard_files(idx: Path) -> list[Path]:
    wm = json.loads(idx.read_text())["weight_map"]
    return sorted({idx.parent / v for v in wm.values()})


def drop_caches(files: list[Path]) -> str:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in files:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def resident(files: list[Path]) -> float:
    import torchpool  # noqa: F401
    from torchpool import _C

    tot = got = 0
    for p in files:
        s = _C.Shard(str(p))
        n = s.file_size
        got += s.resident_fraction(0, n) * n
        tot += n
    return got / tot if tot else 1.0


# ---------------------------------------------------------------- one case, in a fresh process
class Sampler:
    def __init__(self):
        self.peak_anon = self.peak_file = 0
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def status():
        d = {}
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                    d[k] = int(v.split()[0]) * 1024
        return d

    def _run(self):
        while not self._stop:
            s = self.status()
            self.peak_anon = max(self.peak_anon, s["RssAnon"])
            self.peak_file = max(self.peak_file, s["RssFile"])
            time.sleep(0.005)

    def stop(self):
        self._stop = True
        self._t.join()
        s = self.status()
        self.peak_anon = max(self.peak_anon, s["RssAnon"])
        self.peak_file = max(self.peak_file, s["RssFile"])
        return {"peak_rss": s["VmHWM"], "peak_anon": self.peak_anon, "peak_file": self.peak_file}


def touch(tensors) -> None:
    """Reads one byte per page of every tensor: a zero-copy (lazily mapped) result is made resident,
    so that both libraries are timed until the data is really in memory."""
    import torch

    for t in tensors:
        if t.numel():
            t.reshape(-1).view(torch.uint8)[::4096].sum()


def run_case(case: str, idx: Path, budget: int) -> dict:
    import torch

    import torchpool
    import torchpool.lazy
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = shard_files(idx)
    first = next(iter(json.loads(idx.read_text())["weight_map"]))
    model = None
    if case in ("st_model", "tp_model", "tp_budget_forward"):
        from checkpoint_gen import TinyLlama

        with torch.device("meta"):  # built before the clock starts, for both
            model = TinyLlama(layers=layers_for_index(idx), hidden=HIDDEN, inter=INTER, vocab=VOCAB).to(torch.bfloat16)
    base = Sampler.status()
    sampler = Sampler()
    extra = {}
    t0 = time.perf_counter()
    if case == "st_load_file":
        sd = {}
        for p in files:
            sd.update(load_file(str(p)))
        touch(sd.values())
        nbytes = sum(t.nbytes for t in sd.values())
    elif case == "tp_load":
        ck = torchpool.open_checkpoint(idx)
        sd = ck.load()
        touch(sd.values())
        nbytes = sum(t.nbytes for t in sd.values())
        extra["path"] = ck.stats()["last_load_path"]
    elif case == "st_first":
        with safe_open(str(idx.parent / json.loads(idx.read_text())["weight_map"][first]), framework="pt") as f:
            t = f.get_tensor(first)
            touch([t])
        nbytes = t.nbytes
    elif case == "tp_first":
        ck = torchpool.open_checkpoint(idx)
        t = ck.load([first])[first]
        touch([t])
        nbytes = t.nbytes
        extra["path"] = ck.stats()["last_load_path"]
    elif case in ("st_half", "tp_half"):
        out = {}
        nbytes = 0
        if case == "st_half":
            wm = json.loads(idx.read_text())["weight_map"]
            handles = {p: safe_open(str(p), framework="pt") for p in files}
            for n, fn in wm.items():
                s = handles[idx.parent / fn].get_slice(n)
                rows = s.get_shape()[0]
                out[n] = s[: rows // 2]
        else:
            ck = torchpool.open_checkpoint(idx)
            out = ck.load_slices({n: slice(0, ck.info(n).torch_shape[0] // 2) for n in ck.keys()})
            extra["bytes_read"] = ck.stats()["bytes_read"]
        touch(out.values())
        nbytes = sum(t.nbytes for t in out.values())
    elif case in ("st_model", "tp_model", "tp_budget_forward"):
        if case == "st_model":
            sd = {}
            for p in files:
                sd.update(load_file(str(p)))
            model.load_state_dict(sd, assign=True)
        else:
            model = torchpool.load_lazily(model, idx, budget_bytes=budget if case == "tp_budget_forward" else None)
        extra["usable_s"] = time.perf_counter() - t0
        nbytes = 0
        if case == "tp_budget_forward":
            with torch.no_grad():
                model(torch.tensor([[1, 2, 3, 4]]))
            s = torchpool.lazy.stats(model)
            extra.update(budget=budget, peak_resident=s["peak_resident_bytes"], evictions=s["evictions"],
                         over_budget=s["over_budget"])
            nbytes = s["bytes_loaded"]
    else:
        raise SystemExit(f"unknown case {case}")
    dt = time.perf_counter() - t0
    mem = sampler.stop()
    mem["peak_anon"] -= base["RssAnon"]
    mem["peak_file"] -= base["RssFile"]
    return {"case": case, "seconds": dt, "bytes": nbytes, **mem, "base_rss": base["VmRSS"], **extra}


def layers_for_index(idx: Path) -> int:
    wm = json.loads(idx.read_text())["weight_map"]
    return 1 + max(int(n.split(".")[2]) for n in wm if n.startswith("model.layers."))


# ---------------------------------------------------------------- driver
CASES = [  # (label, ours, reference, cold)
    ("full load, cold", "tp_load", "st_load_file", True),
    ("full load, warm", "tp_load", "st_load_file", False),
    ("first tensor, cold", "tp_first", "st_first", True),
    ("half of each weight (a rank's slice), cold", "tp_half", "st_half", True),
    ("usable model (lazy vs meta + load_state_dict(assign=True)), cold", "tp_model", "st_model", True),
    ("layer-by-layer forward under budget, cold", "tp_budget_forward", None, True),
]


def child(case, idx, budget) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--index", str(idx), "--budget", str(budget)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB (default 2; the issue's anchors: 8.2)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/torchpool_bench_ck"))
    ap.add_argument("--budget", type=int, default=0, help="budget for the lazy forward (default: size / 8)")
    ap.add_argument("--case")
    ap.add_argument("--index", type=Path)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(run_case(a.case, a.index, a.budget)))
        return
    idx = generate(a.dir, a.gb)
    files = shard_files(idx)
    size = sum(p.stat().st_size for p in files)
    budget = a.budget or size // 8
    print(f"checkpoint: {idx} ({len(files)} shards, {size / 1e9:.2f} GB bf16, {layers_for_index(idx)} layers); "
          f"lazy budget {budget / 2**20:.0f} MiB; {os.cpu_count()} cores")
    rows = []
    method = None
    for label, ours, ref, cold in CASES:
        res = {}
        for who, case in (("torchpool", ours), ("safetensors", ref)):  # interleaved
            if case is None:
                continue
            if cold:
                method = drop_caches(files)
                res_frac = resident(files)
            else:
                child(case, idx, budget)  # warm-up run, not reported
                res_frac = resident(files)
            r = child(case, idx, budget)
            r["resident_before"] = res_frac
            res[who] = r
        rows.append((label, res))
    gib = 2**30
    print(f"cold = {method}\n")
    hdr = f"| case | who | time s | GB/s | ratio (st/tp) | peak RSS GiB | peak anon GiB | peak file GiB | notes |"
    print(hdr)
    print("|" + "---|" * 9)
    for label, res in rows:
        tp, st = res.get("torchpool"), res.get("safetensors")
        for who, r in (("torchpool", tp), ("safetensors", st)):
            if r is None:
                continue
            secs = r.get("usable_s", r["seconds"]) if "model" in r["case"] else r["seconds"]
            gbps = f"{r['bytes'] / secs / 1e9:.2f}" if r["bytes"] and "model" not in r["case"] else ""
            ratio = ""
            if who == "torchpool" and st is not None:
                s_secs = st.get("usable_s", st["seconds"]) if "model" in st["case"] else st["seconds"]
                ratio = f"{s_secs / secs:.2f}x"
            notes = []
            if "path" in r:
                notes.append(f"path={r['path']}")
            if "bytes_read" in r:
                notes.append(f"read {r['bytes_read'] / 1e9:.2f} GB")
            if "peak_resident" in r:
                notes.append(f"peak resident {r['peak_resident'] / gib:.2f} GiB of budget {r['budget'] / gib:.2f}, "
                             f"{r['evictions']} evictions, total {r['seconds']:.1f} s")
            notes.append(f"resident before {r['resident_before']:.0%}")
            print(f"| {label} | {who} | {secs:.3f} | {gbps} | {ratio} | {r['peak_rss'] / gib:.2f} | "
                  f"{r['peak_anon'] / gib:.2f} | {r['peak_file'] / gib:.2f} | {'; '.join(notes)} |")


if __name__ == "__main__":
    main()
