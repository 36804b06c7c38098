"""Training and inference give bit-identical numbers under torchpool and PyTorch's default allocator.

Each allocator runs in a fresh interpreter (the CPU allocator slot is process-wide): the same seed,
the same shapes, the same model; only who serves the tensors' memory differs.
"""

import json

import pytest

CHILD = r"""
import json, sys
import torch
import torchpool
from torchpool.cli import workloads

mode = sys.argv[1] if len(sys.argv) > 1 else {mode!r}
if mode != "default":
    torchpool.install(**json.loads(mode))
    assert torchpool.is_installed()
train = workloads.gpt_train("quick", seed=3, steps={steps})
cnn = workloads.cnn_inference("quick", seed=5, batches={batches})
out = {{
    "losses": [float.hex(x) for x in train["losses"]],
    "seq_lens": train["seq_lens"],
    "digest": cnn["output_digest"],
    "sums": [float.hex(x) for x in cnn["output_sums"]],
    "sides": cnn["sides"],
    "installed": torchpool.is_installed(),
}}
if torchpool.is_installed():
    s = torchpool.memory_stats()
    out["allocated_total"] = s["allocated_bytes.all.allocated"]
print(json.dumps(out))
"""


def _run(python_subprocess, mode: str, steps: int = 4, batches: int = 2) -> dict:
    r = python_subprocess(CHILD.format(mode=mode, steps=steps, batches=batches))
    assert r.returncode == 0, f"workload under {mode} failed:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_run():
    from conftest import run_python

    return _run(run_python, "default")


@pytest.mark.parametrize(
    "options",
    [
        "{}",  # the install() defaults (expandable segments on host_vmm)
        '{"arenas": 1, "expandable_segments": false, "huge_pages": true, "size_classes": false}',  # host mmap, best fit, one arena
        '{"expandable_segments": false, "max_reserved_ratio": 0}',  # host mmap segments kept forever
    ],
    ids=["defaults", "host-bestfit-1arena-huge", "host-nolimit"],
)
def test_bit_identical_under_torchpool(python_subprocess, default_run, options):
    pooled = _run(python_subprocess, options)
    assert not default_run["installed"]
    assert pooled["installed"]
    # torchpool really served the workload's tensors (not just installed and bypassed).
    assert pooled["allocated_total"] > 100 << 20
    assert pooled["seq_lens"] == default_run["seq_lens"]
    assert len(pooled["losses"]) == 5  # warm-up + 4
    assert pooled["losses"] == default_run["losses"], "training losses differ between allocators"
    assert pooled["sides"] == default_run["sides"]
    assert pooled["sums"] == default_run["sums"], "CNN output sums differ between allocators"
    assert pooled["digest"] == default_run["digest"], "CNN outputs differ between allocators"


def test_alloc_mix_sizes_follow_the_issue_mix():
    import torch  # noqa: F401

    from torchpool.cli import workloads

    sizes = workloads.alloc_mix_sizes(5000, seed=0)
    small = [n for n in sizes if n <= 1 << 20]
    large = [n for n in sizes if n > 1 << 20]
    assert all(1 << 10 <= n for n in small)
    assert all(4 << 20 <= n <= 256 << 20 for n in large)
    assert 0.08 < len(large) / len(sizes) < 0.12
    r = workloads.alloc_mix("quick", ops=20)
    assert r["touched_bytes"] == sum(workloads.alloc_mix_sizes(20, seed=0))
    assert r["wall_s"] > 0 and r["cpu_s"] >= 0
