#!/usr/bin/env bash
# atheris fuzzing of the trace importers and the replay (tests/fuzz/fuzz_trace.py), through the
# Python API, from the seed corpus tests/fuzz/corpus/trace (never modified: new inputs go to a
# temporary directory).  FUZZ_SECONDS (default 60) is split over the targets.  Exits non-zero on a
# finding (the crashing input is kept in $FUZZ_ARTIFACTS, default build/fuzz_py/); skips cleanly
# when atheris is not installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
TARGETS=${FUZZ_TARGETS:-"any native rmm snapshot replay"}
ARTIFACTS=${FUZZ_ARTIFACTS:-build/fuzz_py}
if ! "$PY" -c "import atheris" 2>/dev/null; then
  echo "fuzz_py: SKIPPED: atheris is not installed (install it with: $PY -m pip install atheris)"
  exit 0
fi
set -- $TARGETS
per=$(( FUZZ_SECONDS / $# ))
(( per >= 1 )) || per=1
mkdir -p "$ARTIFACTS"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
total_execs=0
start=$(date +%s)
for t in "$@"; do
  mkdir -p "$work/$t"
  log="$ARTIFACTS/$t.log"
  # -max_len covers the large seeds (> 8 KB: deep nesting and many records); -rss_limit_mb catches
  # inputs that make torchpool allocate past its limits; -timeout catches hangs.
  if ! "$PY" tests/fuzz/fuzz_trace.py "$t" -max_total_time="$per" -max_len=262144 -rss_limit_mb=3072 \
      -timeout=20 -artifact_prefix="$ARTIFACTS/$t-" "$work/$t" tests/fuzz/corpus/trace >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz_py: target $t FAILED (input kept under $ARTIFACTS/)"
    exit 1
  fi
  execs=$(grep -Eo '#[0-9]+' "$log" | tail -1 | tr -d '#')
  total_execs=$(( total_execs + ${execs:-0} ))
  echo "fuzz_py: $t: ${execs:-0} executions in ${per}s, corpus $(ls "$work/$t" | wc -l) new + $(ls tests/fuzz/corpus/trace | wc -l) seeds"
done
echo "fuzz_py: OK: $total_execs executions, $(( $(date +%s) - start ))s, seed corpus $(ls tests/fuzz/corpus/trace | wc -l) files ($(du -sh tests/fuzz/corpus/trace | cut -f1))"
