"""GPT-style training with variable sequence lengths (a small decoder-only transformer, AdamW)."""

import torch
import torch.nn as nn

from record_common import record


class GPT(nn.Module):
    def __init__(self, vocab=2048, d=192, layers=3, heads=6, ctx=384):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        t = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        x = self.tok(idx) + self.pos(torch.arange(t))
        return self.head(self.blocks(x, mask=mask, is_causal=True))


def workload():
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(1)
    for step in range(14):
        seq = int(torch.randint(32, 384, (1,), generator=g))  # variable sequence length per batch
        idx = torch.randint(0, 2048, (8, seq + 1), generator=g)
        logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


if __name__ == "__main__":
    record("gpt_train", workload, __doc__, model="3-layer d=192 decoder, batch 8, seq 32..384, 14 steps")
