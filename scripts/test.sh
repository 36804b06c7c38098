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
# The jobs in scripts/ci/ (sanitizer builds, fuzzing, packaging), each timed. SKIP_JOBS="fuzz_cpp wheel"
# leaves those out (for a quick local run); CI runs all of them.
for job in scripts/ci/*.sh; do
  name=$(basename "$job" .sh)
  case " ${SKIP_JOBS:-} " in *" $name "*) echo "== $name: skipped (SKIP_JOBS)"; continue ;; esac
  start=$(date +%s)
  echo "== $name"
  VENV="$VENV" JOBS="$JOBS" bash "$job"
  echo "== $name: $(( $(date +%s) - start )) s"
done
# Python tests import the installed package, not the source tree.
cd tests && "../$VENV/bin/python" -m pytest -q "$@"
