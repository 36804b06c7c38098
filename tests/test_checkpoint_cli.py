"""`torchpool inspect` and the loader's demo step."""

from __future__ import annotations

import io
import json

import torch

from checkpoint_gen import llama_like, raw_file, write_sharded
from torchpool import cli


def test_inspect_valid_sharded(tmp_path, capsys):
    sd = llama_like(layers=2, hidden=32, inter=48, vocab=64, dtype=torch.bfloat16)
    idx = write_sharded(tmp_path / "ck", sd, 2)
    assert cli.main(["inspect", str(idx), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "shards:  2" in out and f"tensors: {len(sd)}" in out and "BF16" in out
    assert f"bytes:   {sum(t.nbytes for t in sd.values())}" in out and "largest 3:" in out
    assert "model.embed_tokens.weight" in out  # among the largest
    assert cli.main(["inspect", str(idx.parent), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["valid"] and d["tensors"] == len(sd) and d["dtypes"]["BF16"]["tensors"] == len(sd)


def test_inspect_invalid(tmp_path, capsys):
    bad = raw_file(tmp_path / "bad.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4)
    assert cli.main(["inspect", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and "data-past-eof" in out and "'a'" in out
    assert cli.main(["inspect", str(bad), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["rule"] == "data-past-eof"


def test_loader_demo_step(tmp_path):
    from torchpool.cli import loader_demo

    out = io.StringIO()
    r = loader_demo.run(tmp_path, out)
    text = out.getvalue()
    assert r["checkpoint_bytes"] > r["budget_bytes"] and r["peak_resident_bytes"] <= r["budget_bytes"]
    assert r["outputs_equal"] and r["evictions"] > 0
    assert "budget" in text and "checkpoint" in text
