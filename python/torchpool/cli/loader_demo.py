"""The loader's step of `torchpool demo`: write a checkpoint larger than a memory budget, run a model
over it lazily under that budget, and check the output against an unbudgeted run."""

from __future__ import annotations

import json
import pathlib
import struct
import time

import torch

LAYERS = 16
WIDTH = 256  # each layer: 256 x 256 float32 + bias = 257 KiB; the checkpoint is about 4 MiB
BUDGET_LAYERS = 4


def _write(path: pathlib.Path, tensors: dict) -> None:
    """A plain safetensors writer (8-byte aligned header), enough for the demo's float32 tensors."""
    header, chunks, off = {"__metadata__": {"format": "pt", "written_by": "torchpool demo"}}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        chunks.append(b)
        off += len(b)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(chunks))


def _model() -> torch.nn.Module:
    layers = []
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


def run(workdir: pathlib.Path, out) -> dict:
    import torchpool
    from torchpool.checkpoint import lazy

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    sd = {}
    for i in range(LAYERS):
        sd[f"{2 * i}.weight"] = torch.randn(WIDTH, WIDTH, generator=g) / WIDTH ** 0.5
        sd[f"{2 * i}.bias"] = torch.randn(WIDTH, generator=g) * 0.1
    path = workdir / "demo_checkpoint.safetensors"
    _write(path, sd)
    ck_bytes = sum(t.nbytes for t in sd.values())
    layer_bytes = (WIDTH * WIDTH + WIDTH) * 4
    budget = BUDGET_LAYERS * layer_bytes
    x = torch.randn(8, WIDTH, generator=g)

    t0 = time.perf_counter()
    model = torchpool.load_lazily(_model, path, budget_bytes=budget)
    bind_s = time.perf_counter() - t0
    with torch.no_grad():
        t1 = time.perf_counter()
        y = model(x)
        fwd_s = time.perf_counter() - t1
        y_again = model(x)
    s = lazy.stats(model)
    full = torchpool.load_lazily(_model, path)  # no budget: every layer stays
    with torch.no_grad():
        y_full = full(x)
    equal = bool(torch.equal(y, y_full) and torch.equal(y_again, y_full))
    lazy.binding(model).remove()
    lazy.binding(full).remove()

    mib = 1 << 20
    print(f"checkpoint  {path.name}: {len(sd)} tensors, {ck_bytes / mib:.2f} MiB ({LAYERS} linear layers)", file=out)
    print(f"budget      {budget / mib:.2f} MiB ({BUDGET_LAYERS} layers): the checkpoint is {ck_bytes / budget:.1f}x the budget",
          file=out)
    print(f"bind        load_lazily returned in {bind_s * 1e3:.1f} ms (meta model, nothing read yet)", file=out)
    print(f"forward     {fwd_s * 1e3:.1f} ms; layers loaded {s['loads']} times, evicted {s['evictions']} times "
          f"over two forwards", file=out)
    print(f"resident    peak {s['peak_resident_bytes'] / mib:.2f} MiB of checkpoint tensors (budget "
          f"{budget / mib:.2f} MiB), now {s['resident_bytes'] / mib:.2f} MiB", file=out)
    print(f"output      budgeted == unbudgeted: {equal}", file=out)
    return {
        "checkpoint_bytes": ck_bytes,
        "budget_bytes": budget,
        "peak_resident_bytes": s["peak_resident_bytes"],
        "resident_bytes": s["resident_bytes"],
        "loads": s["loads"],
        "evictions": s["evictions"],
        "bind_ms": bind_s * 1e3,
        "forward_ms": fwd_s * 1e3,
        "outputs_equal": equal,
    }


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(run(pathlib.Path(d), sys.stdout))
