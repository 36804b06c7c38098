#!/usr/bin/env bash
# Packaging check (issue 13): `pip wheel --no-build-isolation .` builds a wheel that installs into a
# fresh virtual environment holding only the pinned torch (no compiler, no build tools) and runs;
# the sdist builds and carries what a build needs. Assumes scripts/setup.sh has run (VENV as there).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
VENV=${VENV:-.venv}
case $VENV in /*) ;; *) VENV=$REPO/$VENV ;; esac
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
"$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps . -w "$OUT/dist"
wheel=$(ls "$OUT"/dist/torchpool-*.whl)
# The wheel holds the subpackages (checkpoint/, tracing/, cli/), the native parts and the trace suite.
python3 - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["torchpool/__init__.py", "torchpool/checkpoint/__init__.py", "torchpool/checkpoint/reader.py",
        "torchpool/checkpoint/lazy.py", "torchpool/tracing/__init__.py", "torchpool/tracing/replay.py",
        "torchpool/cli/__init__.py", "torchpool/cli/demo.py", "torchpool/traces/gpt_train.tptrace.gz"]
missing = [n for n in need if n not in names]
assert not missing, f"the wheel lacks {missing}"
assert any(n.startswith("torchpool/_C.") and n.endswith(".so") for n in names), "the wheel lacks the extension"
PY
# A fresh environment: torch (the version the wheel was built against) and the wheel, nothing else.
python3 -m venv "$OUT/venv"
"$OUT/venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 "$wheel"
cd "$OUT"  # not the source tree: import the installed package
"$OUT/venv/bin/torchpool" --version
"$OUT/venv/bin/python" - <<'PY'
import torch, torchpool
torchpool.install()
x = torch.randn(1 << 20) * 2
assert torch.equal(x, x.clone())
s = torchpool.memory_stats()
assert s["allocated_bytes.all.current"] >= x.nbytes, s["allocated_bytes.all.current"]
del x
import torchpool.lazy, torchpool.checkpoint.lazy  # an old module name is the moved module (Note [Moved modules])
assert torchpool.lazy is torchpool.checkpoint.lazy and torchpool.trace is torchpool.tracing.trace
print("wheel: installed and ran, version", torchpool.__version__)
PY
# python -m under an old module name (how a replay measures in a fresh process) and the new one.
[ "$("$OUT/venv/bin/python" -m torchpool.replay --probe torchpool)" = ok ]
[ "$("$OUT/venv/bin/python" -m torchpool.tracing.replay --probe torchpool)" = ok ]
"$OUT/venv/bin/torchpool" bench fragmentation --help >/dev/null
# The sdist: builds, and holds the sources, the vendored headers and the trace suite.
"$VENV/bin/python" -m build -q --sdist --no-isolation -o "$OUT/sdist" "$REPO" >/dev/null
sdist=$(ls "$OUT"/sdist/torchpool-*.tar.gz)
tar -tzf "$sdist" > "$OUT/sdist.txt"
for f in CMakeLists.txt csrc/core/pool.cc third_party/nlohmann/json.hpp bench/traces/gpt_train.tptrace.gz; do
  grep -q "^torchpool-[^/]*/$f$" "$OUT/sdist.txt" || { echo "sdist lacks $f" >&2; exit 1; }
done
# ... and a wheel builds from it alone (no git checkout around it).
"$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps "$sdist" -w "$OUT/from-sdist"
ls "$OUT"/from-sdist/torchpool-*.whl >/dev/null
echo "sdist: $(basename "$sdist") holds the sources and builds a wheel"
