#!/usr/bin/env bash
# Install fastmezo and its test dependencies (scripts/setup.sh), then run the C++ tests of the noise
# contract (ctest) and the Python tests (pytest). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh

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
# pytest's exit code 5 means "no tests collected": a broken test set-up, reported as a failure.
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
fi
exit "$rc"
