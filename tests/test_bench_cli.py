"""`torchpool bench fragmentation`: JSON rows for a given trace and allocators."""

import json
import subprocess
import sys

from torchpool import trace as T


def test_bench_fragmentation_json(tmp_path):
    rec = T.make_records(4)
    rec["addr"] = [1, 2, 1, 2]
    rec["requested"] = [3 << 20, 1000, 3 << 20, 1000]
    rec["size"] = rec["requested"]
    rec["op"] = [0, 0, 1, 1]
    p = T.save(T.Trace(rec, {"name": "tiny"}), tmp_path / "tiny.tptrace.gz")
    r = subprocess.run([sys.executable, "-m", "torchpool", "bench", "fragmentation", "--trace", str(p),
                        "--allocators", "torchpool,pytorch", "--json", "--repeats", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["allocator"] for x in rows] == ["torchpool", "pytorch"]
    assert all(x["trace"] == "tiny" and x["peak_live_bytes"] == (3 << 20) + 1000 for x in rows)
    assert rows[1]["peak_reserved_bytes"] == 22 << 20  # 20 MiB buffer + 2 MiB small segment


def test_bench_unknown_allocator_fails_cleanly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torchpool", "bench", "fragmentation", "--allocators", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown allocator" in r.stderr


def test_installed_package_finds_the_trace_suite():
    # The wheel carries bench/traces; `torchpool bench fragmentation` with no --trace must find them
    # whether the package was installed from a wheel or in editable mode.
    from torchpool.bench import suite_dir

    names = sorted(p.name for p in suite_dir().glob("*.tptrace.gz"))
    assert {"gpt_train.tptrace.gz", "cnn_infer.tptrace.gz", "kv_decode.tptrace.gz", "finetune_ckpt.tptrace.gz"} <= set(names)
