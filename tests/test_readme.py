"""Every Python block of README.md runs as written, as a newcomer would paste it: each in a fresh
interpreter, after only the setup that stands in for the reader's own program (their checkpoint,
their training step, their model), which the README leaves to them. A new block fails
test_every_block_is_run until it is run here or by the test named in ELSEWHERE."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"

# (section, index of the python block within it) -> the test that runs it as written.
ELSEWHERE = {
    ("Use", 0): "test_install_lifecycle.py::test_readme_use_block_runs_top_to_bottom",
    ("Transformers", 0): "test_hf.py::test_readme_recipe",
    ("Distributed checkpoints (torch.distributed.checkpoint)", 0): "test_distributed.py (the dcp.load recipe)",
}

# (section, index) -> (setup: what the README leaves to the reader, check: asserts on what the block made)
SETUP = {
    ("Checkpoints", 0): (
        """
        import torch, torchpool
        from checkpoint_gen import TinyLlama, llama_like, write_sharded
        sd = llama_like(hidden=16, inter=5632, vocab=64)
        write_sharded("llama", sd, 4)
        with torch.device("meta"):
            meta_model = TinyLlama(hidden=16, inter=5632, vocab=64)
        """,
        """
        assert torch.equal(w, sd["lm_head.weight"])
        assert set(sd) == set(ck.keys()) and all(torch.equal(sd[k], v) for k, v in ck.load(device="cpu").items())
        assert torch.equal(rows, sd["model.layers.0.mlp.up_proj.weight"][:2816])
        assert torchpool.lazy.binding(model) is not None
        """,
    ),
    ("Fragmentation: traces, replay, reports", 0): (
        """
        import torch, torchpool
        torchpool.install()
        def train_step():
            model = torch.nn.Linear(64, 64)
            model(torch.randn(32, 64)).sum().backward()
        """,
        """
        trace = torchpool.trace.load("run.tptrace.gz")
        assert trace.count("alloc") > 0 and trace.count("free") > 0, trace
        import pickle  # our own file, just written
        with open("snap.pickle", "rb") as f:
            assert "segments" in pickle.load(f)
        """,
    ),
    ("Leaks", 0): (
        """
        import torch, torchpool
        torchpool.install()
        kept = []
        loader = range(12)
        def train_step(batch):
            kept.append(torch.randn(128, 1024))   # 512 KiB a step that nobody frees
        """,
        """
        assert len(det.leaks()) == 1 and det.leaks()[0].growth_per_step > 0, det.report()
        """,
    ),
    ("Leaks", 1): (
        """
        import torch, torchpool
        torchpool.install()
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = torch.nn.Linear(256, 1024)
                self.fc2 = torch.nn.Linear(1024, 256)
            def forward(self, x):
                h = torch.relu(self.fc1(x))
                return self.fc2(h)
        """,
        """
        print(det.report())
        assert det.leaks() and "`total`" in det.report(), det.report()
        """,
    ),
    ("Monitoring", 0): (
        """
        import torch, torchpool
        torchpool.install()
        def train():
            x = torch.randn(1024, 1024)
            return x.sum()
        """,
        """
        import os
        assert os.path.isdir("runs/mem") and os.listdir("runs/mem")
        """,
    ),
}


def python_blocks() -> dict:
    """(section, index within the section) -> code, for every ```python block of the README."""
    blocks, counts, section = {}, {}, None
    for m in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```", README.read_text(), re.M | re.S):
        if m.group(1):
            section = m.group(1).strip()
            continue
        i = counts.get(section, 0)
        counts[section] = i + 1
        blocks[(section, i)] = m.group(2)
    return blocks


def test_every_block_is_run():
    assert set(python_blocks()) == set(ELSEWHERE) | set(SETUP)


@pytest.mark.parametrize("key", sorted(SETUP), ids=lambda k: f"{k[0]}-{k[1]}")
def test_block_runs_as_written(key, tmp_path):
    if key == ("Monitoring", 0):
        pytest.importorskip("prometheus_client")
        pytest.importorskip("torch.utils.tensorboard")
    setup, check = SETUP[key]
    code = textwrap.dedent(setup) + python_blocks()[key] + textwrap.dedent(check) + "\nprint('README-BLOCK-OK')\n"
    env = {k: v for k, v in os.environ.items() if k != "TORCHPOOL_CONF"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.rstrip().endswith("README-BLOCK-OK"), r.stdout[-2000:]
