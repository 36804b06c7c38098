"""The README's first command: `torchpool demo` runs end to end and prints a readable report."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TORCHPOOL_CONF"}
    r = subprocess.run([sys.executable, "-m", "torchpool", "demo", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for needle in ("default (glibc)", "torchpool", "peak RSS", "bit-identical", "utilization",
                   "external fragmentation", "busiest size classes"):
        assert needle in out, needle
    # The fragmentation step (torchpool.fragmentation_demo): this run's trace replayed, as a table.
    frag = out.split("== fragmentation of this run's allocations, replayed ==", 1)[1]
    for needle in ("peak reserved", "utilization", "Mops/s"):
        assert needle in frag, needle
    lines = [ln.split() for ln in frag.splitlines() if ln.strip().startswith("demo_run")]
    assert {ln[1] for ln in lines} >= {"torchpool", "pytorch", "pytorch-expandable", "glibc"}, frag
    assert (tmp_path / "demo_run.tptrace.gz").exists()
