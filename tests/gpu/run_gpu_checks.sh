#!/usr/bin/env bash
# The GPU checks of issue 14 in one run (under five minutes on one GPU): the pytest files of tests/gpu,
# each check in its own interpreter, results as JSON lines in $OUT_DIR/gpu_report.jsonl (default: a temp
# dir) for docs/reference/cuda.md.  Exits 0 without running anything where torch sees no GPU.
#   bash tests/gpu/run_gpu_checks.sh [pytest args]        (PYTHON=... to pick the interpreter)
set -u
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python}"
if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "run_gpu_checks: no GPU visible to torch here; nothing to run (the fake-driver tests cover the rest)"
  exit 0
fi
out_dir="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$out_dir"
export TORCHPOOL_GPU_REPORT="$out_dir/gpu_report.jsonl"
: > "$TORCHPOOL_GPU_REPORT"
"$py" -c "import torch, torchpool; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'devices', torch.cuda.device_count())" | tee "$out_dir/env.txt"
start=$(date +%s)
timeout 290 "$py" -m pytest -q -rA "$here" "$@" 2>&1 | tee "$out_dir/pytest.txt"
rc=${PIPESTATUS[0]}
echo "run_gpu_checks: rc=$rc in $(( $(date +%s) - start )) s; report: $TORCHPOOL_GPU_REPORT"
exit "$rc"
