"""The swap into PyTorch's CPU slot: install/uninstall, startup paths, oneDNN frees, OOM."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torchpool

def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_install_serves_cpu_tensors_and_uninstall_stops(python_subprocess):
    r = python_subprocess(textwrap.dedent("""
        import json, torch, torchpool
        a = torchpool.install()
        base = torchpool.memory_stats()["allocated_bytes.all.current"]
        x = torch.empty(1000, 1000)            # 4 MB: served by torchpool
        grew = torchpool.memory_stats()["allocated_bytes.all.current"] - base
        owned = a.owns(x.data_ptr())
        torchpool.uninstall()
        y = torch.empty(1000, 1000)            # after uninstall: the previous allocator
        other = a.owns(y.data_ptr())
        del x
        after = torchpool.allocator()
        print(json.dumps({"grew": grew, "owned": owned, "other": other, "after": after is None,
                          "live": a.stats()["allocated_bytes.all.current"], "check": a.check()}))
        """))
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert out["grew"] >= 4_000_000 and out["owned"] and not out["other"]
    assert out["after"] and out["check"] == ""
    assert out["live"] == 0


def test_installed_context_manager(python_subprocess):
    r = python_subprocess(textwrap.dedent("""
        import json, torch, torchpool
        with torchpool.installed(max_cached_mb=64) as a:
            x = torch.randn(256, 256)
            inside = a.owns(x.data_ptr())
        y = torch.randn(256, 256)
        print(json.dumps({"inside": inside, "outside": a.owns(y.data_ptr()), "installed": torchpool.is_installed()}))
        """))
    assert r.returncode == 0, r.stderr
    assert last_json(r.stdout) == {"inside": True, "outside": False, "installed": False}


def test_environment_variable_installs_at_import(python_subprocess):
    code = "import json, torch, torchpool; x = torch.ones(1 << 20); a = torchpool.allocator(); " \
           "print(json.dumps({'on': a is not None, 'owns': a is not None and a.owns(x.data_ptr())}))"
    r = python_subprocess(code, env={"TORCHPOOL_CONF": "cpu=1,max_cached_mb=4096"})
    assert r.returncode == 0, r.stderr
    assert last_json(r.stdout) == {"on": True, "owns": True}
    r = python_subprocess(code)
    assert last_json(r.stdout) == {"on": False, "owns": False}


def test_bad_environment_variable_names_the_option(python_subprocess):
    r = python_subprocess("import torchpool", env={"TORCHPOOL_CONF": "cpu=1,max_cahced_mb=10"})
    assert r.returncode != 0
    assert "max_cahced_mb" in r.stderr and "TORCHPOOL_CONF" in r.stderr


def test_launcher_swaps_before_first_line(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import sys, json
        import torch, torchpool          # the first lines already see torchpool installed
        x = torch.zeros(512, 512)
        a = torchpool.allocator()
        print(json.dumps({"argv": sys.argv[1:], "on": a is not None, "owns": a.owns(x.data_ptr()),
                          "name": __name__}))
        """))
    env = {k: v for k, v in os.environ.items() if k != "TORCHPOOL_CONF"}
    r = subprocess.run([sys.executable, "-m", "torchpool", "run", "--conf", "cpu=1,max_mb=512", str(script), "--lr", "3"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert last_json(r.stdout) == {"argv": ["--lr", "3"], "on": True, "owns": True, "name": "__main__"}


def test_launcher_passes_script_options_through(tmp_path):
    script = tmp_path / "show.py"
    script.write_text("import sys, json, torchpool; print(json.dumps([sys.argv[1:], torchpool.is_installed()]))")
    r = subprocess.run([sys.executable, "-m", "torchpool", "run", str(script), "--help", "--conf", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [["--help", "--conf", "x"], True]


def test_launcher_reports_missing_script():
    r = subprocess.run([sys.executable, "-m", "torchpool", "run", "no_such_script.py"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no such script" in r.stderr


@pytest.mark.parametrize("order", ["install-then-uninstall", "uninstall-then-install"])
def test_mkldnn_buffers_freed_by_the_allocator_that_made_them(python_subprocess, order):
    # oneDNN frees through whatever allocator is current at free time (raw_deallocate):
    # the process must survive a swap between allocation and free, both ways.
    if order == "install-then-uninstall":
        body = """
        torchpool.install()
        t = torch.randn(64, 64).to_mkldnn()
        torchpool.uninstall()
        del t
        """
    else:
        body = """
        t = torch.randn(64, 64).to_mkldnn()
        torchpool.install()
        del t
        u = torch.randn(64, 64).to_mkldnn(); v = u.to_dense(); del u
        torchpool.uninstall()
        """
    code = "import gc, torch, torchpool\n" + textwrap.dedent(body) + "\ngc.collect()\nprint('survived')"
    r = python_subprocess(code)
    assert r.returncode == 0, r.stderr
    assert "survived" in r.stdout


def test_out_of_memory_is_torch_error_with_state_and_recovers(python_subprocess):
    r = python_subprocess(textwrap.dedent("""
        import json, torch, torchpool
        torchpool.install(max_mb=64)
        keep = torch.empty(40 << 20, dtype=torch.uint8)
        try:
            torch.empty(40 << 20, dtype=torch.uint8)
            print(json.dumps({"raised": False}))
        except torch.OutOfMemoryError as e:
            msg = str(e)
            del keep
            again = torch.empty(60 << 20, dtype=torch.uint8)   # works after the failure
            s = torchpool.memory_stats()
            print(json.dumps({"raised": True, "msg": msg, "ooms": s["num_ooms"], "retries": s["num_alloc_retries"],
                              "again": again.numel(), "check": torchpool.allocator().check()}))
        """))
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert out["raised"]
    for needle in ("out of memory on cpu", "tried to allocate 40.00 MiB", "allocated", "reserved", "cached", "max_bytes=64.00 MiB"):
        assert needle in out["msg"]
    assert out["ooms"] == 1 and out["retries"] >= 1 and out["again"] == 60 << 20 and out["check"] == ""


def test_unknown_option_is_refused():
    with pytest.raises(torchpool.ConfigError, match="no_such_option"):
        torchpool.install(no_such_option=3)


def test_unsupported_device_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        torchpool.install("meta")


def test_profiler_sees_torchpool_memory(python_subprocess):
    r = python_subprocess(textwrap.dedent("""
        import json, torch, torchpool
        torchpool.install()
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            x = torch.ones(1 << 20)
            y = x * 2
            del x, y
        total = sum(e.cpu_memory_usage for e in prof.key_averages() if e.cpu_memory_usage > 0)
        print(json.dumps({"reported": total}))
        """))
    assert r.returncode == 0, r.stderr
    assert last_json(r.stdout)["reported"] >= 2 * 4 * (1 << 20)


def test_reserve_ratio_and_expandable_options_from_the_environment(python_subprocess):
    # The fractional option travels through TORCHPOOL_CONF; the CPU default upstream is host_vmm and
    # expandable_segments=0 selects one mmap per segment.
    r = python_subprocess(
        "import json, torch, torchpool\n"
        "a = torchpool.allocator()\n"
        "t = torch.empty(3 << 20, dtype=torch.uint8)\n"
        "b = torchpool.install(expandable_segments=False, max_reserved_ratio=0)\n"
        "print(json.dumps([a.upstream_name, b.upstream_name]))\n",
        env={"TORCHPOOL_CONF": "cpu=1,max_reserved_ratio=1.2"},
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["host_vmm", "host_mmap"]
    from torchpool import _config

    assert _config.normalize({"max_reserved_ratio": "1.2"}) == {"max_reserved_ratio": 1.2}
    for bad in ("0.5", "x"):
        with pytest.raises(_config.ConfigError, match="max_reserved_ratio"):
            _config.normalize({"max_reserved_ratio": bad})
