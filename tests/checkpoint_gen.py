"""Deterministic safetensors checkpoints for the loader's tests, demo and benchmark.

- ``raw_file(path, header, data)``: writes exactly the bytes asked for (header as a dict or raw
  bytes, an optional length override) -- for malformed files.
- ``write_file(path, tensors, metadata)``: a valid file written by this module (not by the
  ``safetensors`` package), 8-byte aligned like the reference writer.
- ``write_sharded(dir, tensors, n_shards)``: the Hugging Face layout, ``model-0000i-of-0000n.safetensors``
  plus ``model.safetensors.index.json`` (weight_map tensor -> shard file).
- ``llama_like(layers, hidden, ...)``: a small Llama-shaped state dict from a fixed seed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.complex64: "C64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2: "F8_E5M2", torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.float8_e8m0fnu: "F8_E8M0",
    torch.float4_e2m1fn_x2: "F4",
}


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def raw_file(path, header, data: bytes = b"", *, length: int | None = None, pad: bool = True) -> Path:
    """Writes 8-byte length + header + data. header: dict (dumped compactly) or bytes."""
    hb = header if isinstance(header, (bytes, bytearray)) else json.dumps(header, separators=(",", ":")).encode()
    if pad and not isinstance(header, (bytes, bytearray)):
        hb += b" " * (-len(hb) % 8)
    n = len(hb) if length is None else length
    path = Path(path)
    path.write_bytes(struct.pack("<Q", n) + hb + data)
    return path


def file_bytes(tensors: dict, metadata: dict | None = None) -> tuple[dict, bytes]:
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    chunks, off = [], 0
    for name, t in tensors.items():
        b = tensor_bytes(t)
        shape = list(t.shape)
        if t.dtype == torch.float4_e2m1fn_x2:
            shape = shape[:-1] + [shape[-1] * 2] if shape else [2]
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": shape, "data_offsets": [off, off + len(b)]}
        chunks.append(b)
        off += len(b)
    return header, b"".join(chunks)


def write_file(path, tensors: dict, metadata: dict | None = None) -> Path:
    header, data = file_bytes(tensors, metadata)
    return raw_file(path, header, data)


def write_sharded(directory, tensors: dict, n_shards: int, metadata: dict | None = None, *, index: bool = True) -> Path:
    """Splits tensors (in order) into n_shards files of about equal bytes; returns the index path
    (or the directory when index=False)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    per = max(1, -(-total // n_shards))
    shards: list[dict] = [{} for _ in range(n_shards)]
    k, acc = 0, 0
    for name, t in tensors.items():
        if acc >= per * (k + 1) and k < n_shards - 1:
            k += 1
        shards[k][name] = t
        acc += t.numel() * t.element_size()
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        write_file(directory / fname, part, {"format": "pt", **(metadata or {})})
        for name in part:
            weight_map[name] = fname
    if not index:
        return directory
    idx = directory / "model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return idx


def llama_like(layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 256, dtype=torch.float32,
               seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    sd = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = w(hidden, hidden)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        sd[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        sd[p + "mlp.up_proj.weight"] = w(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = w(hidden, inter)
    sd["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    sd["lm_head.weight"] = w(vocab, hidden)
    return sd


class TinyLlama(torch.nn.Module):
    """A model whose state dict matches llama_like(): enough structure for layer-by-layer runs."""

    def __init__(self, layers=2, hidden=64, inter=128, vocab=256):
        super().__init__()
        nn = torch.nn

        class Attn(nn.Module):
            def __init__(self):
                super().__init__()
                self.q_proj = nn.Linear(hidden, hidden, bias=False)
                self.k_proj = nn.Linear(hidden, hidden, bias=False)
                self.v_proj = nn.Linear(hidden, hidden, bias=False)
                self.o_proj = nn.Linear(hidden, hidden, bias=False)

            def forward(self, x):
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
                a = torch.softmax(q @ k.transpose(-1, -2) / hidden ** 0.5, dim=-1)
                return self.o_proj(a @ v)

        class MLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate_proj = nn.Linear(hidden, inter, bias=False)
                self.up_proj = nn.Linear(hidden, inter, bias=False)
                self.down_proj = nn.Linear(inter, hidden, bias=False)

            def forward(self, x):
                return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

        class Norm(nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = nn.Parameter(torch.ones(hidden))

            def forward(self, x):
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

        class Layer(nn.Module):
            def __init__(self):
                super().__init__()
                self.input_layernorm = Norm()
                self.self_attn = Attn()
                self.post_attention_layernorm = Norm()
                self.mlp = MLP()

            def forward(self, x):
                x = x + self.self_attn(self.input_layernorm(x))
                return x + self.mlp(self.post_attention_layernorm(x))

        class Inner(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed_tokens = nn.Embedding(vocab, hidden)
                self.layers = nn.ModuleList(Layer() for _ in range(layers))
                self.norm = Norm()

            def forward(self, ids):
                x = self.embed_tokens(ids)
                for layer in self.layers:
                    x = layer(x)
                return self.norm(x)

        self.model = Inner()
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        return self.lm_head(self.model(ids))
