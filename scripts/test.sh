#!/usr/bin/env bash
# Runs every test: the C++ core tests under AddressSanitizer (ctest), then pytest against the
# installed package. Assumes scripts/setup.sh has run (VENV as there).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
JOBS=${JOBS:-2}
# C++ core + upstreams under ASan/UBSan with the invariant walk after every operation.
cmake -S . -B build/asan -DTORCHPOOL_PYTHON=OFF -DTORCHPOOL_TESTS=ON -DTORCHPOOL_DEBUG=2 \
  -DTORCHPOOL_SANITIZE=address,undefined -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build build/asan -j "$JOBS" >/dev/null
ctest --test-dir build/asan --output-on-failure
# Python tests import the installed package, not the source tree.
cd tests && "../$VENV/bin/python" -m pytest -q "$@"
