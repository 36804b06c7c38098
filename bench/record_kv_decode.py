"""Autoregressive decoding with a growing KV cache and several concurrent requests.

Four request slots; each request has its own prompt length and answer length; finished requests are
replaced by new ones.  Each decode step appends one token to every live request's KV cache
(torch.cat, so each cache is reallocated one token larger, as naive generate loops do)."""

import torch
import torch.nn as nn

from record_common import record

D, HEADS, LAYERS, VOCAB = 256, 4, 4, 4096


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)

    def forward(self, x, cache):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=cache is None)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, D))
        return x + self.mlp(self.n2(x)), (k, v)


def workload():
    emb, head = nn.Embedding(VOCAB, D), nn.Linear(D, VOCAB)
    layers = nn.ModuleList(Layer() for _ in range(LAYERS))
    g = torch.Generator().manual_seed(3)
    slots = [None] * 4  # (caches, last token, tokens left)
    started = 0
    with torch.no_grad():
        for _ in range(160):
            for i, s in enumerate(slots):
                if s is None and started < 14:  # admit a new request: prefill its prompt
                    prompt = torch.randint(0, VOCAB, (1, int(torch.randint(16, 200, (1,), generator=g))), generator=g)
                    x, caches = emb(prompt), []
                    for layer in layers:
                        x, c = layer(x, None)
                        caches.append(c)
                    slots[i] = [caches, head(x[:, -1]).argmax(-1, keepdim=True), int(torch.randint(20, 90, (1,), generator=g))]
                    started += 1
            if all(s is None for s in slots):
                break
            for i, s in enumerate(slots):
                if s is None:
                    continue
                x = emb(s[1])
                new = []
                for layer, c in zip(layers, s[0]):
                    x, c = layer(x, c)
                    new.append(c)
                s[0], s[1] = new, head(x[:, -1]).argmax(-1, keepdim=True)
                s[2] -= 1
                if s[2] == 0:
                    slots[i] = None


if __name__ == "__main__":
    record("kv_decode", workload, __doc__, model="4-layer d=256 decoder, 4 concurrent requests, 14 requests")
