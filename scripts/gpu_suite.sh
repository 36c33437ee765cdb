#!/usr/bin/env bash
# Everything this project checks on a CUDA machine, in one go (used with the device tool on the H200):
# the test suite on CUDA tensors with compiled Triton, the GPU kernel check, the C++ contract test, and
# the perturbation-pass benchmark. Logs and results go to ${OUT:-gpu-out}/. No network needed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest tests -q -p no:cacheprovider > "$OUT/pytest_cuda.log" 2>&1; echo "pytest exit $?"; tail -3 "$OUT/pytest_cuda.log"
(cmake -S . -B /tmp/fm-cmake >/dev/null && cmake --build /tmp/fm-cmake >/dev/null && ctest --test-dir /tmp/fm-cmake 2>&1 | tail -2) || echo "ctest not run"
python3 scripts/check_gpu.py --big > "$OUT/check_gpu.txt" 2>&1; echo "check_gpu exit $?"
python3 bench/bench_perturb.py --models "${MODELS:-opt-1.3b,opt-13b}" --dtypes float16,bfloat16 --out "$OUT" > "$OUT/bench_perturb.txt" 2>&1
echo "bench exit $?"
tail -4 "$OUT/check_gpu.txt"
tail -30 "$OUT/bench_perturb.txt"
