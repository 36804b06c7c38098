"""Deterministic, small, real PyTorch workloads: used by `torchpool demo`, bench/ and the tests.

Each function runs one workload under whatever CPU allocator is current and returns a dict of what
it measured. All of them take ``size="quick"`` (a few seconds, for the demo and the tests) or
``size="bench"`` (for bench/bench_allocators.py), and a ``seed``; the same seed gives the same
sequence of shapes and, under any allocator, the same numbers (losses, outputs).

    gpt_train(size, seed, steps=None)      W2: GPT-style decoder training steps, random sequence lengths
    cnn_inference(size, seed, batches=None) W3: convnet inference at batch 32, variable input shapes
    alloc_mix(size, seed, ops=None)        W1: torch.empty + fill_ + free over the issue's size mix

Every result has ``wall_s`` and ``cpu_s`` (user + sys of the whole process, all threads) measured
around the workload's loop only (model construction and the first-touch of parameters excluded).
"""

from __future__ import annotations

import hashlib
import math
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = ("quick", "bench")


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, not {size!r}")


class _Timer:
    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self.w0
        self.cpu_s = time.process_time() - self.c0
        return False


# ---------------------------------------------------------------------------------------------
# W2: GPT-style training
# ---------------------------------------------------------------------------------------------

GPT_CONFIGS = {
    #          vocab, d_model, heads, layers, batch, min_len, max_len, steps
    "quick": dict(vocab=512, d_model=128, heads=4, layers=2, batch=8, min_len=16, max_len=128, steps=8),
    "bench": dict(vocab=1024, d_model=192, heads=4, layers=3, batch=8, min_len=32, max_len=192, steps=10),
}


class _Block(nn.Module):
    """Pre-norm decoder block: causal self-attention (written out, so the scores are materialised
    as in most training code) and a 4x GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.view(b, t, h, d // h).transpose(1, 2)
        k = k.view(b, t, h, d // h).transpose(1, 2)
        v = v.view(b, t, h, d // h).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h))
        mask = torch.ones(t, t, dtype=torch.bool).triu_(1)
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, max_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def gpt_train(size: str = "quick", seed: int = 0, steps: int | None = None) -> dict:
    """W2: `steps` AdamW training steps of a small GPT-style decoder on random token batches whose
    sequence length is drawn per step, after one untimed warm-up step. Returns losses (floats,
    bit-identical across allocators; losses[0] is the warm-up step's),
    tokens, tokens_per_s, wall_s, cpu_s, cpu_s_per_step, seq_lens."""
    _check_size(size)
    cfg = dict(GPT_CONFIGS[size])
    if steps is not None:
        cfg["steps"] = steps
    torch.manual_seed(seed)
    model = TinyGPT(cfg["vocab"], cfg["d_model"], cfg["heads"], cfg["layers"], cfg["max_len"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    seq_lens = [rng.randint(cfg["min_len"], cfg["max_len"]) for _ in range(cfg["steps"])]
    batches = [torch.randint(cfg["vocab"], (cfg["batch"], t + 1), generator=gen) for t in seq_lens]
    losses: list[float] = []

    def step(data: torch.Tensor) -> int:
        x, y = data[:, :-1], data[:, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, cfg["vocab"]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        return x.numel()

    # One untimed warm-up step (lazy init of oneDNN/MKL, autograd, AdamW state); its loss is losses[0].
    step(torch.randint(cfg["vocab"], (cfg["batch"], cfg["min_len"] + 1), generator=gen))
    tokens = 0
    with _Timer() as tm:
        for data in batches:
            tokens += step(data)
    return {
        "workload": "gpt_train",
        "size": size,
        "losses": losses,
        "seq_lens": seq_lens,
        "steps": cfg["steps"],
        "tokens": tokens,
        "wall_s": tm.wall_s,
        "cpu_s": tm.cpu_s,
        "tokens_per_s": tokens / tm.wall_s,
        "cpu_s_per_step": tm.cpu_s / cfg["steps"],
    }


# ---------------------------------------------------------------------------------------------
# W3: CNN inference
# ---------------------------------------------------------------------------------------------

CNN_CONFIGS = {
    # input side lengths are drawn from `sides` per batch; batch 32; full-resolution activations are
    # 32 images x 16 channels x side^2 x 4 B = 40.5-72 MiB, so glibc maps and unmaps them every batch.
    "quick": dict(batch=32, batches=4, sides=(144, 160, 176), width=16),
    "bench": dict(batch=32, batches=6, sides=(144, 160, 176, 192), width=16),
}


class SmallConvNet(nn.Module):
    """A small ResNet-flavoured convnet (conv-BN-ReLU stem, three stages with a residual block each,
    global pooling, linear head). Eval mode, unfused BN: every layer makes a new activation."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width

        def cbr(cin, cout, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = cbr(3, w)
        self.stages = nn.ModuleList()
        cin = w
        for cout in (w, 2 * w, 4 * w):
            stride = 1 if cout == cin else 2
            self.stages.append(nn.ModuleDict({"down": cbr(cin, cout, stride), "res": cbr(cout, cout)}))
            cin = cout
        self.head = nn.Linear(cin, num_classes)
        # Non-trivial BN statistics, so BN is not an identity.
        g = torch.Generator().manual_seed(1234)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for st in self.stages:
            x = st["down"](x)
            x = x + st["res"](x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


def cnn_inference(size: str = "quick", seed: int = 0, batches: int | None = None) -> dict:
    """W3: inference of SmallConvNet at batch 32 on batches whose (square) input side is drawn per
    batch; the largest activations are 100+ MiB. Returns images, images_per_s, cpu_s_per_image,
    wall_s, cpu_s, sides, max_activation_bytes, output_digest (sha256 of every batch's logits) and
    output_sums."""
    _check_size(size)
    cfg = dict(CNN_CONFIGS[size])
    if batches is not None:
        cfg["batches"] = batches
    torch.manual_seed(seed)
    model = SmallConvNet(width=cfg["width"]).eval()
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    sides = [rng.choice(cfg["sides"]) for _ in range(cfg["batches"])]
    b = cfg["batch"]
    digest = hashlib.sha256()
    sums: list[float] = []
    images = 0
    with torch.inference_mode():
        model(torch.randn(2, 3, 32, 32, generator=gen))  # untimed warm-up (lazy library init)
    with torch.inference_mode(), _Timer() as tm:
        for s in sides:
            x = torch.randn(b, 3, s, s, generator=gen)
            out = model(x)
            digest.update(out.numpy().tobytes())
            sums.append(float(out.double().sum()))
            images += b
    width = model.stem[0].out_channels
    return {
        "workload": "cnn_inference",
        "size": size,
        "images": images,
        "sides": sides,
        "wall_s": tm.wall_s,
        "cpu_s": tm.cpu_s,
        "images_per_s": images / tm.wall_s,
        "cpu_s_per_image": tm.cpu_s / images,
        "max_activation_bytes": b * width * max(sides) ** 2 * 4,
        "output_digest": digest.hexdigest(),
        "output_sums": sums,
    }


# ---------------------------------------------------------------------------------------------
# W1: empty + fill_ + free
# ---------------------------------------------------------------------------------------------

ALLOC_MIX_CONFIGS = {
    "quick": dict(ops=80),
    "bench": dict(ops=300),
}
KiB, MiB = 1 << 10, 1 << 20


def alloc_mix_sizes(ops: int, seed: int = 0) -> list[int]:
    """The issue's size mix: 90 % uniform in 1 KiB-1 MiB, 10 % uniform in 4-256 MiB (bytes)."""
    rng = random.Random(seed)
    return [rng.randint(1 * KiB, 1 * MiB) if rng.random() < 0.9 else rng.randint(4 * MiB, 256 * MiB)
            for _ in range(ops)]


def alloc_mix(size: str = "quick", seed: int = 0, ops: int | None = None, premapped: bool = False) -> dict:
    """W1: for each size of alloc_mix_sizes(): torch.empty(n, dtype=uint8), fill_ (touches every
    byte), free. Returns ops, touched_bytes, touched_gb_per_s (touched / wall), cpu_gb_per_s
    (touched / cpu), wall_s, cpu_s, checksum.

    premapped=True measures the floor instead: the same fills into views of one buffer that was
    allocated and touched before the timer starts (no allocator, no page faults)."""
    _check_size(size)
    n_ops = ops if ops is not None else ALLOC_MIX_CONFIGS[size]["ops"]
    sizes = alloc_mix_sizes(n_ops, seed)
    checksum = 0
    buf = None
    if premapped:
        buf = torch.empty(max(sizes), dtype=torch.uint8)
        buf.fill_(0)
    with _Timer() as tm:
        for i, n in enumerate(sizes):
            t = torch.empty(n, dtype=torch.uint8) if buf is None else buf[:n]
            t.fill_(i & 0xFF)
            checksum += int(t[-1])  # read back one byte, so the fill cannot be skipped
            del t
    touched = sum(sizes)
    return {
        "workload": "alloc_mix",
        "size": size,
        "ops": n_ops,
        "touched_bytes": touched,
        "wall_s": tm.wall_s,
        "cpu_s": tm.cpu_s,
        "touched_gb_per_s": touched / tm.wall_s / 1e9,
        "cpu_gb_per_s": touched / tm.cpu_s / 1e9,
        "checksum": checksum,
        "premapped": premapped,
    }


WORKLOADS = {"W1": alloc_mix, "W2": gpt_train, "W3": cnn_inference}
