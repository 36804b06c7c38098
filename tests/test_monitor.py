"""Issue 10: the leak detector, torch.cuda-style queries, tracemalloc, `torchpool top`, TensorBoard and
Prometheus export.  Each scenario runs in a fresh interpreter (installing the allocator is process-wide)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

PRELUDE = textwrap.dedent("""
    import json, os, sys, threading, time
    import torch, torchpool
    torch.manual_seed(0)
    torchpool.install()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(256, 1024)
            self.fc2 = torch.nn.Linear(1024, 256)

        def forward(self, x):
            h = torch.relu(self.fc1(x))  # LINE_FC1
            return self.fc2(h)  # LINE_FC2

    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def result(leaks):
        print(json.dumps([dict(stack=l.stack, site=l.site, live_bytes=l.live_bytes, growth=l.growth_per_step,
                               count=l.count, kept_by=l.kept_by) for l in leaks]))
""")


def run(body: str, python_subprocess, env=None) -> tuple[list, str]:
    code = PRELUDE + textwrap.dedent(body)
    r = python_subprocess(code, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), code


def line_of(code: str, marker: str) -> int:
    return next(i for i, ln in enumerate(code.splitlines(), 1) if marker in ln)


def test_list_that_gains_a_tensor_every_step_is_named(python_subprocess):
    leaks, code = run("""
        det = torchpool.LeakDetector()
        history = []
        for step in range(20):
            x = torch.randn(256, 256)
            loss = model(x).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            history.append(torch.randn(128, 1024))  # LEAK 512 KiB per step
            det.step()
        result(det.leaks())
        print(det.report(), file=sys.stderr)
    """, python_subprocess)
    want = line_of(code, "# LEAK")
    assert len(leaks) == 1, leaks
    (lk,) = leaks
    assert lk["site"].endswith(f":{want} in <module>"), lk
    assert lk["stack"][-1] == lk["site"]
    assert lk["growth"] == pytest.approx(512 << 10, rel=0.05)  # allocations >= sample_bytes are all sampled
    assert lk["live_bytes"] == pytest.approx(20 * (512 << 10), rel=0.05)
    assert lk["count"] == 20 and lk["kept_by"] is None


def test_clean_loop_reports_nothing(python_subprocess):
    leaks, _ = run("""
        det = torchpool.LeakDetector(sample_bytes=16 << 10)   # sample densely: more chances of a false alarm
        cache = {}
        from collections import deque
        recent = deque(maxlen=3)
        for step in range(30):
            x = torch.randn(256, 256)
            loss = model(x).pow(2).mean()
            opt.zero_grad(set_to_none=step % 2 == 0); loss.backward(); opt.step()  # Adam state made in step 1
            cache.setdefault(step % 4, torch.randn(512, 512))  # a cache that fills once (4 steps)
            recent.append(loss.detach().clone())
            det.step()
        result(det.leaks())
        print(det.report(), file=sys.stderr)
    """, python_subprocess)
    assert leaks == []


def test_graph_kept_by_total_names_the_line_and_the_forward_lines(python_subprocess):
    # An evaluation loop without torch.no_grad(): `total = total + loss` keeps every step's graph and
    # with it the activations saved in forward.
    leaks, code = run("""
        det = torchpool.LeakDetector()
        total = 0
        for step in range(15):
            x = torch.randn(256, 256)
            loss = model(x).pow(2).mean()
            total = total + loss  # ACCUMULATE
            det.step()
        result(det.leaks())
        print(det.report(), file=sys.stderr)
    """, python_subprocess)
    acc, fc1 = line_of(code, "# ACCUMULATE"), line_of(code, "# LINE_FC1")
    sites = {lk["site"] for lk in leaks}
    assert any(s.endswith(f":{fc1} in forward") for s in sites), sites
    for lk in leaks:
        assert lk["kept_by"] and "`total`" in lk["kept_by"] and f":{acc} in <module>" in lk["kept_by"], lk
        assert lk["growth"] > 0


def test_graph_chain_after_backward_is_flagged(python_subprocess):
    # Training with backward(): the saved tensors are freed each step, the chained graph nodes are not.
    leaks, code = run("""
        det = torchpool.LeakDetector()
        total = 0
        for step in range(12):
            loss = model(torch.randn(64, 256)).pow(2).mean()
            total = total + loss  # ACCUMULATE
            opt.zero_grad(); loss.backward(); opt.step()
            det.step()
        result(det.leaks())
    """, python_subprocess)
    acc = line_of(code, "# ACCUMULATE")
    assert len(leaks) == 1, leaks
    assert leaks[0]["site"].endswith(f":{acc} in <module>") and "`total`" in leaks[0]["kept_by"]


def test_second_thread_allocating_while_the_detector_runs(python_subprocess):
    leaks, code = run("""
        det = torchpool.LeakDetector()
        stop = threading.Event()
        kept_by_thread = []
        def worker():
            n = 0
            while not stop.is_set():
                t = torch.empty(300_000)  # freed at once, except every 50th
                if n % 50 == 0:
                    kept_by_thread.append(t)  # THREAD
                n += 1
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads: t.start()
        held = []
        for step in range(15):
            loss = model(torch.randn(64, 256)).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            held.append(torch.randn(200_000))  # MAIN
            time.sleep(0.02)
            det.step()
        stop.set()
        for t in threads: t.join()
        result(det.leaks())
        assert torchpool.allocator().check() == ""
    """, python_subprocess)
    sites = {lk["site"] for lk in leaks}
    assert any(s.endswith(f":{line_of(code, '# MAIN')} in <module>") for s in sites), sites
    assert any(s.endswith(f":{line_of(code, '# THREAD')} in worker") or
               s.endswith(f":{line_of(code, '# THREAD') - 2} in worker") for s in sites), sites


def test_memory_queries_summary_and_frames(python_subprocess):
    out, code = run("""
        import torch.cuda._memory_viz as mv
        from torchpool.tracing.memviz import to_memory_viz
        det = torchpool.LeakDetector(sample_bytes=4096)
        big = torch.empty(3_000_000)  # BIG
        s = torchpool.memory_stats()
        q = dict(a=torchpool.memory_allocated(), ma=torchpool.max_memory_allocated("cpu"),
                 r=torchpool.memory_reserved(torch.device("cpu")), mr=torchpool.max_memory_reserved(None))
        summary = torchpool.memory_summary()
        data = to_memory_viz(torchpool.memory_snapshot())
        framed = [b for seg in data["segments"] for b in seg["blocks"] if b["frames"]]
        mv.segsum(data)
        print(summary, file=sys.stderr)
        print(json.dumps(dict(q=q, s=[s[k] for k in ("allocated_bytes.all.current", "allocated_bytes.all.peak",
                                                   "reserved_bytes.all.current", "reserved_bytes.all.peak")],
                              summary=summary, big=big.untyped_storage().data_ptr(),
                              framed={b["address"]: b["frames"][0] for b in framed})))
    """, python_subprocess)
    assert [out["q"][k] for k in ("a", "ma", "r", "mr")] == out["s"]
    assert "largest live blocks" in out["summary"] and "top allocation sites" in out["summary"]
    big_line = line_of(code, "# BIG")
    assert f":{big_line} in <module>" in out["summary"]
    frame = out["framed"][str(out["big"])]
    assert frame["line"] == big_line and frame["name"] == "<module>"


def test_memory_queries_refuse_when_not_installed(python_subprocess):
    r = python_subprocess("import torchpool\ntry:\n    torchpool.memory_allocated()\nexcept RuntimeError as e:\n    print('refused', e)")
    assert "refused" in r.stdout and "install" in r.stdout, r.stdout + r.stderr


def test_memory_queries_keep_describing_live_blocks_after_uninstall(python_subprocess):
    r = python_subprocess(
        "import torch, torchpool\n"
        "torchpool.install()\n"
        "t = torch.empty(1 << 20, dtype=torch.uint8)\n"
        "torchpool.uninstall()\n"
        "print(torchpool.memory_allocated() >= (1 << 20), torchpool.max_memory_allocated() >= (1 << 20))\n"
        "del t\n"
        "print(torchpool.memory_allocated(), torchpool.max_memory_allocated() >= (1 << 20))\n"
    )
    assert r.stdout.split() == ["True", "True", "0", "True"], r.stdout + r.stderr


def test_tracemalloc_sees_tensors(python_subprocess):
    out, code = run("""
        import tracemalloc
        tracemalloc.start(5)
        torchpool.report_to_tracemalloc()
        t = torch.empty(1 << 20)  # TENSOR
        f = tracemalloc.DomainFilter(True, torchpool.TRACEMALLOC_DOMAIN)
        stats = tracemalloc.take_snapshot().filter_traces([f]).statistics("lineno")
        top = [(s.traceback[0].lineno, s.size) for s in stats]
        del t
        after = sum(s.size for s in tracemalloc.take_snapshot().filter_traces([f]).statistics("lineno"))
        torchpool.report_to_tracemalloc(False)
        print(json.dumps(dict(top=top, after=after)))
    """, python_subprocess)
    assert [line_of(code, "# TENSOR"), 4 << 20] in out["top"]
    assert out["after"] == 0


TOP_CHILD = textwrap.dedent("""
    import os, sys, time, torch, torchpool
    torch.set_num_threads(1)
    torchpool.install()
    keep = torch.empty(int(sys.argv[1]) // 4)
    torchpool._C.monitor.publish_now()
    print("ready", flush=True)
    sys.stdin.readline()
""")


def _top_json(env=None):
    r = subprocess.run([sys.executable, "-m", "torchpool", "top", "--once", "--json"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_top_lists_a_live_process_and_removes_a_dead_ones_page(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TORCHPOOL_CONF"}
    env["TORCHPOOL_PUBLISH_DIR"] = str(tmp_path / "pages")
    child = subprocess.Popen([sys.executable, "-c", TOP_CHILD, str(24 << 20)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        rows = _top_json(env)
        mine = [r for r in rows if r["pid"] == child.pid]
        assert len(mine) == 1, rows
        assert mine[0]["device"] == "cpu"
        assert mine[0]["memory_stats"]["allocated_bytes.all.current"] >= 24 << 20
        assert mine[0]["memory_stats"]["reserved_bytes.all.peak"] >= 24 << 20
        page = tmp_path / "pages" / str(child.pid)
        assert oct(page.stat().st_mode & 0o777) == "0o600"
        assert oct((tmp_path / "pages").stat().st_mode & 0o777) == "0o700"
        r = subprocess.run([sys.executable, "-m", "torchpool", "top", "--once"], capture_output=True, text=True,
                           env=env, timeout=120)
        assert str(child.pid) in r.stdout and "allocated" in r.stdout
    finally:
        child.kill()
        child.wait()
    assert page.exists()  # killed: it could not remove its page
    assert all(r["pid"] != child.pid for r in _top_json(env))
    assert not page.exists()


def test_forked_child_publishes_its_own_page_and_publish_0_turns_it_off(tmp_path, python_subprocess):
    env = {"TORCHPOOL_PUBLISH_DIR": str(tmp_path / "pages")}
    r = python_subprocess(textwrap.dedent("""
        import os, json, time, torch, torchpool
        from torchpool.cli.top import read_pages
        torch.set_num_threads(1)
        torchpool.install()
        x = torch.empty(1 << 20)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            y = torch.empty(2 << 20)
            torchpool._C.monitor.publish_now()
            os.write(w, b"x"); time.sleep(30); os._exit(0)
        os.read(r, 1)
        torchpool._C.monitor.publish_now()  # the page is otherwise refreshed every 250 ms
        rows = {p["pid"]: p["memory_stats"]["allocated_bytes.all.current"] for p in read_pages()}
        os.kill(pid, 9); os.waitpid(pid, 0)
        print(json.dumps(dict(rows=rows, me=os.getpid(), child=pid)))
    """), env=env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["rows"][str(d["me"])] == 4 << 20
    assert d["rows"][str(d["child"])] == 12 << 20  # the parent's block (copied) and its own
    r = python_subprocess("import torch, torchpool, os\ntorchpool.install(publish=0)\nx = torch.ones(10)\n"
                          "print(torchpool._C.monitor.publishing(), os.listdir(os.environ['TORCHPOOL_PUBLISH_DIR']) "
                          "if os.path.isdir(os.environ['TORCHPOOL_PUBLISH_DIR']) else [])", env=env)
    assert r.stdout.split()[0] == "False" and str(d["me"]) not in r.stdout


def test_tensorboard_scalars_read_back(tmp_path, python_subprocess):
    pytest.importorskip("tensorboard")
    logdir = tmp_path / "tb"
    r = python_subprocess(textwrap.dedent(f"""
        import time, torch, torchpool
        torchpool.install()
        with torchpool.monitor(interval_s=0.05, tensorboard={str(logdir)!r}) as mon:
            x = torch.empty(1 << 20)
            time.sleep(0.3)
        print(mon.samples)
    """))
    assert r.returncode == 0, r.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for stat in ("allocated_bytes", "reserved_bytes", "active_bytes", "utilization", "external_fragmentation", "ooms"):
        assert f"torchpool/cpu/{stat}" in tags, tags
    values = [e.value for e in ea.Scalars("torchpool/cpu/allocated_bytes")]
    assert len(values) >= 3 and max(values) == 4 << 20 and values[-1] == 4 << 20
    assert [e.step for e in ea.Scalars("torchpool/cpu/ooms")] == list(range(len(values)))


def test_prometheus_scrape_parsed(python_subprocess):
    pytest.importorskip("prometheus_client")
    r = python_subprocess(textwrap.dedent("""
        import json, urllib.request, torch, torchpool
        from prometheus_client.parser import text_string_to_metric_families
        torchpool.install()
        x = torch.empty(1 << 20)
        with torchpool.monitor(prometheus_port=0) as mon:
            body = urllib.request.urlopen(f"http://127.0.0.1:{mon.prometheus_port}/metrics", timeout=10).read().decode()
        fams = {f.name: (f.type, [(s.name, s.labels, s.value) for s in f.samples]) for f in text_string_to_metric_families(body)}
        print(json.dumps(dict(fams=fams, alloc=torchpool.memory_allocated())))
    """))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    fams = d["fams"]
    assert fams["torchpool_allocated_bytes"] == ["gauge", [["torchpool_allocated_bytes", {"device": "cpu"}, d["alloc"]]]]
    assert fams["torchpool_ooms"][0] == "counter"
    assert fams["torchpool_ooms"][1][0][:2] == ["torchpool_ooms_total", {"device": "cpu"}]
    assert fams["torchpool_utilization_ratio"][1][0][2] == pytest.approx(1.0, abs=0.5)


@pytest.mark.parametrize("blocked, kwargs, package", [
    ("prometheus_client", "prometheus_port=0", "prometheus-client"),
    ("torch.utils.tensorboard", "tensorboard='x'", "tensorboard"),
])
def test_missing_optional_package_is_named(python_subprocess, blocked, kwargs, package):
    r = python_subprocess(f"import sys; sys.modules[{blocked!r}] = None\nimport torchpool\ntorchpool.install()\n"
                          f"try:\n    torchpool.monitor({kwargs})\nexcept ImportError as e:\n    print('ERR', e)")
    assert f"`{package}`" in r.stdout, r.stdout + r.stderr


def test_demo_leak_step_names_the_planted_line():
    import torchpool.cli.leak_demo as demo

    r = subprocess.run([sys.executable, "-m", "torchpool.cli.leak_demo"], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "TORCHPOOL_CONF"})
    assert r.returncode == 0, r.stderr
    src = open(demo.__file__).read().splitlines()
    line = next(i for i, ln in enumerate(src, 1) if "the planted leak" in ln)
    assert "1 growing allocation site" in r.stdout and f"leak_demo.py:{line} in loop" in r.stdout, r.stdout
