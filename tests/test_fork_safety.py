"""fork while other threads allocate: the child must never inherit a held allocator lock (Note [Fork]).

Each scenario runs in a fresh interpreter (the allocator swap is process-wide); a hang is a child that
has not exited within its timeout, counted and killed, never a hung test run.
"""

import json
import textwrap

import pytest

FORK_STRESS = textwrap.dedent("""
    import json, os, signal, sys, threading, time, warnings
    warnings.simplefilter("ignore", DeprecationWarning)   # fork with threads: the point of the test
    import torch, torchpool
    torch.set_num_threads(1)
    torchpool.install({opts})
    stop = threading.Event()

    def churn(seed):
        sizes = [64, 1000, 5000, 40000, 300000, 3 << 20]
        i = seed
        while not stop.is_set():
            xs = [torch.empty(sizes[(i + k) % len(sizes)] // 4) for k in range(6)]
            torchpool.memory_stats()          # stats take every arena lock
            del xs
            i += 1

    threads = [threading.Thread(target=churn, args=(s,), daemon=True) for s in range({threads})]
    for t in threads:
        t.start()
    hangs = failures = 0
    for n in range({forks}):
        pid = os.fork()
        if pid == 0:                          # child: allocate, free, read the state, leave
            try:
                ys = [torch.ones(s) for s in (10, 10000, 1 << 20)]
                ok = all(int(y.sum()) == y.numel() for y in ys)
                del ys
                ok = ok and torchpool.allocator().check() == ""
                torchpool.memory_stats()
                os._exit(0 if ok else 3)
            except BaseException:
                os._exit(4)
        deadline = time.monotonic() + {timeout}
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                failures += os.waitstatus_to_exitcode(status) != 0
                break
            if time.monotonic() > deadline:
                hangs += 1
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join()
    print(json.dumps({{"hangs": hangs, "failures": failures, "check": torchpool.allocator().check()}}))
    """)


@pytest.mark.parametrize("arenas,thread_cache", [(1, 0), (4, 0), (4, 1)])
def test_fork_while_threads_allocate_never_hangs(python_subprocess, arenas, thread_cache):
    code = FORK_STRESS.format(opts=f"arenas={arenas}, thread_cache={thread_cache}", threads=2, forks=200, timeout=10)
    r = python_subprocess(code, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"hangs": 0, "failures": 0, "check": ""}


def test_fork_dataloader_workers_allocate(python_subprocess):
    code = textwrap.dedent("""
        import json, threading, warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch, torchpool
        from torch.utils.data import DataLoader, Dataset
        torchpool.install()
        stop = threading.Event()

        def churn():                          # the parent keeps allocating while workers are forked
            while not stop.is_set():
                xs = [torch.empty(n) for n in (16, 4096, 1 << 18)]
                del xs

        class Ds(Dataset):
            def __len__(self):
                return 64
            def __getitem__(self, i):
                a = torch.full((1000 + i,), float(i))   # workers allocate through the inherited torchpool
                b = torch.randn(64, 64) @ torch.randn(64, 64)
                return a.sum() / (1000 + i) + 0 * b.sum()

        t = threading.Thread(target=churn, daemon=True)
        t.start()
        sums = []
        for epoch in range(8):
            dl = DataLoader(Ds(), batch_size=8, num_workers=2, multiprocessing_context="fork", timeout=60)
            sums.append(float(torch.cat([b for b in dl]).sum()))
        stop.set()
        t.join()
        print(json.dumps({"sums": sums, "check": torchpool.allocator().check()}))
        """)
    r = python_subprocess(code, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["check"] == ""
    assert out["sums"] == [float(sum(range(64)))] * 8
