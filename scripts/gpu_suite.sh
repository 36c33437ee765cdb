#!/usr/bin/env bash
# Everything this project checks on a CUDA machine, in one go: build (native CUDA kernels included when
# nvcc is there), the test suite on CUDA tensors (the tests marked gpu included), the C++ contract test,
# compute-sanitizer on the native kernels, and the perturbation-pass benchmark. Logs and results go to
# ${OUT:-gpu-out}/. No network needed.
# BENCH=triton|native|both (default both) picks which backends the OPT benchmark times.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
start=$(date +%s)
FASTMEZO_REQUIRE_NATIVE=1 python3 -m pip install -v --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 || echo "pip install failed (see build.log)"
echo "build: $(( $(date +%s) - start )) s"
python3 -m pytest tests -q -p no:cacheprovider > "$OUT/pytest_cuda.log" 2>&1; echo "pytest exit $?"; tail -3 "$OUT/pytest_cuda.log"
(cmake -S . -B /tmp/fm-cmake >/dev/null && cmake --build /tmp/fm-cmake -j 8 >/dev/null && ctest --test-dir /tmp/fm-cmake 2>&1 | tail -2) || echo "ctest not run"
timeout 240 compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_native.py > "$OUT/sanitizer.txt" 2>&1
echo "compute-sanitizer memcheck exit $?"; tail -2 "$OUT/sanitizer.txt"
for backend in triton native; do
  case "${BENCH:-both}" in both|"$backend") ;; *) continue ;; esac
  python3 -m bench.bench_perturb --backend "$backend" --models "${MODELS:-opt-1.3b,opt-13b}" \
    --dtypes "${DTYPES:-float16,bfloat16}" --out "$OUT" > "$OUT/bench_perturb_$backend.txt" 2>&1
  echo "bench $backend exit $?"
done
for f in "$OUT"/bench_perturb_*.txt; do tail -16 "$f"; done
