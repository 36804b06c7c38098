"""Fine-tuning with activation checkpointing: a frozen base transformer with LoRA adapters,
each block recomputed in backward (torch.utils.checkpoint), variable sequence lengths."""

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from record_common import record

D = 256


class LoRALinear(nn.Module):
    def __init__(self, cin, cout, r=8):
        super().__init__()
        self.base = nn.Linear(cin, cout)
        self.base.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(cin, r) * 0.01)
        self.b = nn.Parameter(torch.zeros(r, cout))

    def forward(self, x):
        return self.base(x) + x @ self.a @ self.b


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.o = LoRALinear(D, 3 * D), LoRALinear(D, D)
        self.up, self.down = LoRALinear(D, 4 * D), LoRALinear(4 * D, D)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, 4, D // 4).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, D))
        return x + self.down(nn.functional.gelu(self.up(self.n2(x))))


def workload():
    blocks = nn.ModuleList(Block() for _ in range(4))
    emb, head = nn.Embedding(2048, D), nn.Linear(D, 2048)
    emb.requires_grad_(False)
    head.requires_grad_(False)
    params = [p for p in blocks.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(4)
    for _ in range(10):
        seq = int(torch.randint(48, 320, (1,), generator=g))
        idx = torch.randint(0, 2048, (6, seq + 1), generator=g)
        x = emb(idx[:, :-1])
        for blk in blocks:
            x = checkpoint(blk, x, use_reentrant=False)
        loss = nn.functional.cross_entropy(head(x).reshape(-1, 2048), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


if __name__ == "__main__":
    record("finetune_ckpt", workload, __doc__, model="4-layer d=256 LoRA r=8, checkpointed blocks, seq 48..320, 10 steps")
