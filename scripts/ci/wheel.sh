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
print("wheel: installed and ran, version", torchpool.__version__)
PY
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
