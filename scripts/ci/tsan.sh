#!/usr/bin/env bash
# ThreadSanitizer job: the C++ tests (core, upstreams, loader, replay, fake CUDA) built with
# -fsanitize=thread, then the multi-thread stress (tests/cpp/test_stress.cc: allocate, free from other
# threads, stats, snapshot, check, empty_cache, trace recording, Router install/uninstall cycles,
# fork while threads allocate) again at a larger scale.  Any data race fails the job.
# Takes about 5 minutes on 2 cores: the build ~4.5 min from scratch, the tests ~35 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
JOBS=${JOBS:-2}
SCALE=${TORCHPOOL_STRESS_SCALE:-4}
# TORCHPOOL_DEBUG=1 (cheap assertions): the invariant walk after every operation (level 2) runs in
# the ASan job; here it would only slow the interleavings TSan needs.
cmake -S . -B build/tsan -DTORCHPOOL_PYTHON=OFF -DTORCHPOOL_TESTS=ON -DTORCHPOOL_DEBUG=1 \
  -DTORCHPOOL_SANITIZE=thread -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build/tsan -j "$JOBS" >/dev/null
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}"
ctest --test-dir build/tsan --output-on-failure
TORCHPOOL_STRESS_SCALE=$SCALE build/tsan/torchpool_cpp_tests -tc="stress*,router*,fork*"
