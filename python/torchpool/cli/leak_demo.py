"""The demo's leak step: a small training loop that keeps one tensor per step in a list, and the
leak detector naming that line.  Runs in a fresh interpreter (torchpool installed there only).

    python -m torchpool.cli.leak_demo      # the loop and det.report()
"""

from __future__ import annotations

import subprocess
import sys


def loop(steps: int = 12) -> str:
    import torch

    import torchpool

    torchpool.install()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
    opt = torch.optim.Adam(model.parameters())
    det = torchpool.LeakDetector()
    seen = []
    for _ in range(steps):
        x = torch.randn(128, 256)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(x.repeat(4, 1))  # the planted leak: 512 KiB kept every step
        det.step()
    return det.report()


def run(workdir, out) -> dict:
    r = subprocess.run([sys.executable, "-m", "torchpool.cli.leak_demo"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"torchpool demo: the leak step failed:\n{r.stderr}")
    print("A training loop keeps `x.repeat(4, 1)` (512 KiB) in a list every step; "
          "torchpool.LeakDetector, sampling one allocation per 256 KiB with its Python stack:\n", file=out)
    print(r.stdout.rstrip(), file=out)
    return {"report": r.stdout}


if __name__ == "__main__":
    print(loop())
