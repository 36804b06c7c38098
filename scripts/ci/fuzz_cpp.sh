#!/usr/bin/env bash
# libFuzzer + ASan/UBSan on the safetensors header parser and validate() (issue 11): builds
# tests/fuzz/fuzz_header.cc with clang and runs it for FUZZ_SECONDS (default 60) on the seed corpus
# tests/fuzz/corpus/header (read only; new inputs go to build/fuzz/corpus). Installs clang with
# apt-get when it is missing and this runs as root; otherwise skips, printing the install command.
# A crash leaves build/fuzz/crash-* and exits non-zero: add the input to the seed corpus and a test.
set -euo pipefail
cd "$(dirname "$0")/../.."
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
OUT=build/fuzz
find_clang() {
  for c in "${CLANGXX:-}" clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
    if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1; then echo "$c"; return 0; fi
  done
  return 1
}
CXX=$(find_clang || true)
if [ -z "$CXX" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "fuzz_cpp: installing clang (apt-get)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang >/dev/null) || true
  CXX=$(find_clang || true)
fi
if [ -z "$CXX" ]; then
  echo "fuzz_cpp: SKIPPED: no clang++ with libFuzzer; install it with: apt-get update && apt-get install -y clang"
  exit 0
fi
mkdir -p "$OUT/corpus"
start=$(date +%s)
if ! "$CXX" -std=c++20 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
    -fno-sanitize-recover=undefined -Icsrc -isystem third_party \
    tests/fuzz/fuzz_header.cc csrc/loader/safetensors.cc -o "$OUT/fuzz_header" 2>"$OUT/build.log"; then
  if grep -q "fuzzer" "$OUT/build.log"; then
    cat "$OUT/build.log" >&2
    echo "fuzz_cpp: SKIPPED: $CXX cannot link libFuzzer; install it with: apt-get update && apt-get install -y clang"
    exit 0
  fi
  cat "$OUT/build.log" >&2
  exit 1
fi
echo "fuzz_cpp: built with $($CXX --version | head -1) in $(( $(date +%s) - start )) s"
# -max_len: the largest seeds (deep nesting, many tensors) are ~350 KB; mutations may grow to 512 KB.
set +e
"$OUT/fuzz_header" -max_total_time="$FUZZ_SECONDS" -max_len=524288 -timeout=20 -rss_limit_mb=2560 \
  -print_final_stats=1 -artifact_prefix="$OUT/" "$OUT/corpus" tests/fuzz/corpus/header >"$OUT/fuzz.log" 2>&1
status=$?
set -e
if [ "$status" != 0 ]; then tail -n 60 "$OUT/fuzz.log"; else grep -E "^(Done|stat::|INFO: seed corpus)" "$OUT/fuzz.log" || true; fi
echo "fuzz_cpp: seed corpus $(ls tests/fuzz/corpus/header | wc -l) files ($(du -sk tests/fuzz/corpus/header | cut -f1) KiB), " \
     "corpus now $(ls "$OUT/corpus" | wc -l) new files; total $(( $(date +%s) - start )) s"
exit "$status"
